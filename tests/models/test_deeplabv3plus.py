"""DeepLabv3+: logits at the input size, the decoder on the stride-4 map, ASPP rates scaled to the
deepest map's stride, MOAT window attention passed through, MobileDet backbones asked for their stride-4
map, backbones without one refused."""
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import mobilezoo  # noqa: F401  (registers the models with timm)
from mobilezoo.errors import UserError
from mobilezoo.layers import RelPosAttention2d
from mobilezoo.models import create_model, get_entry, load_weights, save_weights
from mobilezoo.models.deeplabv3plus import DeepLabV3Plus, returned_maps, scaled_rates
from mobilezoo.models.weights import load_pretrained

SMALL = dict(aspp_channels=32, decoder_channels=24, low_level_channels=8)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _shapes_seen(model: DeepLabV3Plus, x: torch.Tensor) -> dict:
    """Input shapes of the ASPP and the decoder, and the logits, on one forward pass."""
    seen = {}
    hooks = [model.aspp.register_forward_pre_hook(lambda m, a: seen.__setitem__("aspp", a[0].shape)),
             model.decoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("decoder", a[0].shape))]
    with torch.no_grad():
        seen["logits"] = model(x).shape
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("backbone, kwargs, widths", [
    ("tiny_moat_0", {}, (32, 256)),  # global attention (MOAT's ADE20K setting)
    ("tiny_moat_0", {"window_size": (None, None, 4, None)}, (32, 256)),  # 4x4 windows at stride 16
    ("tiny_moat_1", {}, (40, 320)),
])
def test_logits_at_input_size_from_stride_4_and_32_maps(backbone, kwargs, widths):
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", backbone=backbone, num_classes=7, **SMALL, **kwargs).eval()
    assert (model.output_stride, model.atrous_rates) == (32, (3, 6, 9))  # the paper's OS16 rates, halved
    low, deep = model.backbone.feature_info[model.low_index], model.backbone.feature_info[-1]
    assert (low["reduction"], low["num_chs"], deep["num_chs"]) == (4, *widths)
    x = torch.randn(2, 3, 96, 160)  # not square; 160 is not a multiple of 4x4 windows of the 10-wide map
    seen = _shapes_seen(model, x)
    assert seen["logits"] == (2, 7, 96, 160)
    assert seen["aspp"] == (2, widths[1], 3, 5)  # stride 32
    assert seen["decoder"] == (2, SMALL["aspp_channels"] + SMALL["low_level_channels"], 24, 40)  # stride 4


def test_window_attention_reaches_the_backbone_and_changes_the_output():
    torch.manual_seed(0)
    glob = create_model("deeplabv3plus", num_classes=3, **SMALL).eval()
    win = create_model("deeplabv3plus", num_classes=3, window_size=(None, None, 2, None), **SMALL).eval()
    windows = {m.window for m in win.backbone.stages[2].modules() if isinstance(m, RelPosAttention2d)}
    assert windows == {(2, 2)}
    assert {m.window for m in glob.backbone.stages[2].modules() if isinstance(m, RelPosAttention2d)} == {None}
    win.load_state_dict(glob.state_dict())  # same weights: only the attention pattern differs
    x = torch.randn(1, 3, 128, 128)  # an 8x8 map at stride 16: 2x2 windows are not global
    with torch.no_grad():
        assert not torch.allclose(glob(x), win(x), atol=1e-4)


def test_architecture_follows_deeplabv3plus_and_torchvision():
    model = create_model("deeplabv3plus", num_classes=21)
    aspp = model.aspp
    assert len(aspp.convs) == 5  # 1x1, three atrous 3x3, image pooling
    dilations = [b[0].dilation[0] for b in list(aspp.convs)[1:4]]
    assert dilations == [3, 6, 9] and all(b[0].kernel_size == (3, 3) for b in list(aspp.convs)[1:4])
    assert isinstance(aspp.convs[4][0], nn.AdaptiveAvgPool2d)
    assert [b[0].out_channels if not isinstance(b[0], nn.AdaptiveAvgPool2d) else b[1].out_channels
            for b in aspp.convs] == [256] * 5
    assert aspp.project[0].in_channels == 5 * 256 and aspp.project[0].out_channels == 256
    assert isinstance(aspp.project[-1], nn.Dropout) and aspp.project[-1].p == 0.1
    assert model.low_level[0].out_channels == 48
    convs = [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(304, 256, (3, 3)), (256, 256, (3, 3))]
    assert model.classifier.out_channels == 21 and model.classifier.kernel_size == (1, 1)
    assert model.training and model(torch.randn(2, 3, 64, 64)).shape == (2, 21, 64, 64)  # logits in train mode too


def test_rates_scale_with_the_stride_and_can_be_given():
    assert scaled_rates(16) == (6, 12, 18) and scaled_rates(32) == (3, 6, 9) and scaled_rates(8) == (12, 24, 36)
    model = create_model("deeplabv3plus", num_classes=2, atrous_rates=(2, 4, 6), **SMALL)
    assert [b[0].dilation[0] for b in list(model.aspp.convs)[1:4]] == [2, 4, 6]


def test_registered_through_timm_for_the_segment_task():
    assert get_entry("deeplabv3plus").task == "segment"
    model = timm.create_model("deeplabv3plus", num_classes=4, **SMALL)
    assert isinstance(model, DeepLabV3Plus) and model.num_classes == 4


def test_mobiledet_backbone_gives_the_decoder_its_stride_4_map():
    # A MobileDet backbone returns SSDLite's strides 16 and 32 by default; DeepLabv3+ asks it for 4 and 32.
    torch.manual_seed(0)
    model = create_model("deeplabv3plus", backbone="mobiledet_cpu", num_classes=3, aspp_channels=32,
                         decoder_channels=32).eval()
    assert [m["reduction"] for m in returned_maps(model.backbone)] == [4, 32]
    assert model.atrous_rates == (3, 6, 9)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.backbone(x)
        assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (2, 3)]
        assert model.low_level[0].in_channels == feats[0].shape[1]
        assert model(x).shape == (1, 3, 64, 96)


def test_backbone_without_a_stride_4_map_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"strides 16, 32; DeepLabv3\+ needs a stride-4 map") as e:
        create_model("deeplabv3plus", backbone="mobiledet_cpu", num_classes=3, backbone_args={"out_indices": (3, 4)})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="window_size"):
        create_model("deeplabv3plus", backbone="mobiledet_cpu", window_size=(None, None, 4, None))


def test_other_class_count_resets_only_the_classifier(tmp_path):
    torch.manual_seed(0)
    src = create_model("deeplabv3plus", num_classes=5, **SMALL)
    save_weights(src, tmp_path / "w.safetensors")
    dst = create_model("deeplabv3plus", num_classes=3, **SMALL)
    reset = load_pretrained(dst, tmp_path / "w.safetensors")
    assert reset is not None and set(reset.keys) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(dst.aspp.project[0].weight, src.aspp.project[0].weight)
    same = create_model("deeplabv3plus", num_classes=5, **SMALL)
    load_weights(same, tmp_path / "w.safetensors")
    torch.testing.assert_close(same.classifier.weight, src.classifier.weight)


def test_separable_decoder_is_the_papers_and_lighter():
    full = create_model("deeplabv3plus", num_classes=3)
    sep = create_model("deeplabv3plus", num_classes=3, separable=True).eval()
    depthwise = [m for m in sep.decoder.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert [(m.in_channels, m.groups, m.kernel_size) for m in depthwise] == [(304, 304, (3, 3)), (256, 256, (3, 3))]
    weights = [sum(p.numel() for p in m.decoder.parameters()) for m in (full, sep)]
    assert weights[1] < weights[0] / 8
    with torch.no_grad():
        assert sep(torch.randn(1, 3, 64, 96)).shape == (1, 3, 64, 96)


def test_a_stride_16_deepest_map_gets_the_papers_rates():
    model = create_model("deeplabv3plus", num_classes=3, backbone_args={"out_indices": (0, 2)}, **SMALL).eval()
    assert (model.output_stride, model.atrous_rates) == (16, (6, 12, 18))
    seen = _shapes_seen(model, torch.randn(1, 3, 64, 96))
    assert seen["aspp"] == (1, 128, 4, 6) and seen["logits"] == (1, 3, 64, 96)


def test_backbone_of_a_trained_detector_loads_into_the_segmenter(tmp_path):
    """model.backbone_checkpoint with a detector run's weights: its `backbone.*` tensors (MobileDet-CPU)
    become the segmenter's backbone, its heads are left out and named; a segmenter on another backbone
    is refused with the keys that do not fit."""
    from mobilezoo.models.weights import CheckpointError, load_backbone
    torch.manual_seed(0)
    detector = create_model("ssdlite_mobiledet_cpu", num_classes=5)
    path = tmp_path / "model.safetensors"
    save_weights(detector, path)
    seg = create_model("deeplabv3plus", num_classes=6, backbone="mobiledet_cpu")
    line = load_backbone(seg, path)
    own = seg.backbone.state_dict()
    assert own.keys() and all(torch.equal(v, detector.state_dict()["backbone." + k]) for k, v in own.items())
    others = len(detector.state_dict()) - len(own)
    assert line.endswith(f"{len(own)} backbone tensors loaded into MobileDetBackbone; left out {others} tensors "
                         "of the model's other parts (box_heads.*, cls_heads.*, extras.*)")
    with pytest.raises(CheckpointError, match="backbone.. tensors match none of MOAT's: a model on another backbone"):
        load_backbone(create_model("deeplabv3plus", num_classes=6, backbone="tiny_moat_0"), path)
    save_file({**detector.state_dict(), "backbone.extra.weight": torch.zeros(3)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected 1 keys: backbone.extra.weight"):
        load_backbone(seg, tmp_path / "extra.safetensors")
