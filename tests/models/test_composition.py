"""Families composed from shared parts: SSDLite over any feature backbone, the checkpoint rename hook."""
import pytest
import torch

from mobilezoo.errors import UserError
from mobilezoo.models import CheckpointError, create_model, get_entry, load_weights, save_weights
from mobilezoo.models.ssdlite import SSDLite, feature_channels


def _targets():
    return [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
            {"boxes": torch.tensor([[20.0, 10.0, 60.0, 44.0]]), "labels": torch.tensor([0])}]


def test_ssdlite_on_a_moat_feature_backbone_trains_and_detects():
    torch.manual_seed(0)
    backbone = create_model("tiny_moat_0", features_only=True, out_indices=(2, 3))
    assert feature_channels(backbone) == [128, 256]
    model = SSDLite(backbone, num_classes=2)
    assert model.box_heads[0][0][0].in_channels == 128 and model.box_heads[1][0][0].in_channels == 256
    x = torch.randn(2, 3, 64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.backbone.stem[0].weight.detach().clone()
    model.train()
    loss = sum(model(x, _targets()).values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert not torch.equal(model.backbone.stem[0].weight, before)  # the backbone is trained too
    model.eval()
    with torch.no_grad():
        dets = model(x)
    assert len(dets) == 2 and all(set(d) == {"boxes", "scores", "labels"} for d in dets)
    assert all(d["boxes"].shape[-1] == 4 and (d["labels"] < 2).all() for d in dets) and len(dets[0]["boxes"]) > 0


def test_ssdlite_refuses_anchor_specs_that_do_not_match_the_maps():
    backbone = create_model("tiny_moat_0", features_only=True, out_indices=(2, 3))
    with pytest.raises(UserError, match="one entry per feature map"):
        SSDLite(backbone, anchor_specs=[[(0.1, 1.0)]] * 5)


def test_ssdlite_mobiledet_rebuilds_from_its_settings():
    torch.manual_seed(0)
    model = create_model("ssdlite_mobiledet_cpu", num_classes=3, nms_iou=0.5, anchor_scales=(0.15, 0.9, 0.075)).eval()
    twin = SSDLite(create_model("mobiledet_cpu"), **model.settings()).eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model.head_outputs(x), twin.head_outputs(x)
    torch.testing.assert_close(a[0], b[0])
    assert twin.nms_iou == 0.5 and twin.anchor_specs[0][0] == (0.075, 1.0)


def test_load_weights_renames_foreign_keys_and_reports_them_by_their_own_name(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny_moat_0", num_classes=3)
    foreign = {"net." + k: v.clone() + 1 for k, v in model.state_dict().items()}
    path = tmp_path / "foreign.pth"
    torch.save(foreign, path)
    strip = lambda k: k[len("net."):] if k.startswith("net.") else k  # noqa: E731
    load_weights(model, path, rename=strip)
    torch.testing.assert_close(model.head.weight, foreign["net.head.weight"], rtol=0, atol=0)
    foreign["net.extra.weight"] = torch.zeros(1)
    torch.save(foreign, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys: net\.extra\.weight$"):
        load_weights(model, path, rename=strip)
    with pytest.raises(CheckpointError, match="both map to 'head.bias'"):
        load_weights(model, path, rename=lambda k: "head.bias")


def test_registry_entry_carries_squeezetime_checkpoint_filter(tmp_path):
    entry = get_entry("squeezetime_mini")
    assert entry.checkpoint_filter("cls_head.fc_cls.weight") == "head.weight"
    assert entry.checkpoint_filter("backbone.conv1.weight") == "conv1.weight"
    assert get_entry("tiny_moat_0").checkpoint_filter is None
    torch.manual_seed(0)
    model = create_model("squeezetime_mini", num_classes=4)
    official = {("cls_head.fc_cls." + k[len("head."):]) if k.startswith("head.") else "backbone." + k: v
                for k, v in model.state_dict().items()}
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official}, path)
    loaded = create_model("squeezetime_mini", num_classes=4, checkpoint=path)
    torch.testing.assert_close(loaded.head.weight, model.head.weight, rtol=0, atol=0)
    ours = tmp_path / "ours.safetensors"  # our own files go through the same filter unchanged
    save_weights(model, ours)
    torch.testing.assert_close(create_model("squeezetime_mini", num_classes=4, checkpoint=ours).conv1.weight,
                               model.conv1.weight, rtol=0, atol=0)


def test_validate_arch_lives_with_the_architecture_format():
    from mobilezoo.models.mobiledet import ARCHS, validate_arch
    from mobilezoo.nas import validate_arch as from_nas
    assert from_nas is validate_arch
    assert validate_arch(ARCHS["dsp"]) == ARCHS["dsp"]


def test_registered_ssdlite_puts_window_attention_in_a_tiny_moat_backbone():
    model = create_model("ssdlite", num_classes=3)  # backbone tiny_moat_0 by default
    attn = [[b.attn.window for b in model.backbone.stages[s]] for s in (2, 3)]
    assert attn == [[(10, 10)] * 7, [None] * 2]  # 2x2 windows on the 20x20 map at 320 px; global at stride 32
    assert feature_channels(model.backbone) == [128, 256] and model.num_classes == 3
    own = create_model("ssdlite", num_classes=3, window_size=(None, None, 7, 7))
    assert own.backbone.stages[2][0].attn.window == (7, 7)
    with pytest.raises(UserError):
        create_model("ssdlite", backbone="tiny_moat_0", anchor_scales=(0.9, 0.2, 0.1))
