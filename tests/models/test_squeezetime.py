"""SqueezeTime: sizes, cost, shapes and official-checkpoint loading; numbers from /work/shared/specs/squeezetime.md."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mobilezoo.models.squeezetime as sqt  # registers squeezetime, squeezetime_mini
from mobilezoo.deploy.profile import count_macs  # FlopCounterMode / 2
from mobilezoo.layers.temporal import CTLBottleneck, IOIGate
from mobilezoo.models import CheckpointError, create_model, get_entry, load_weights, save_weights

KEYS_TSV = Path(__file__).with_name("squeezetime_official_keys.tsv")  # copy of specs/squeezetime_official_keys.tsv


def official_keys() -> dict[str, tuple[int, ...]]:
    """name -> shape of every official backbone state-dict entry (the spec's key table)."""
    rows = KEYS_TSV.read_text().splitlines()
    assert rows[0] == "name\tshape"
    out = {}
    for row in rows[1:]:
        name, shape = row.split("\t")
        out[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


def meta_model(name="squeezetime", **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- size and cost (spec §3)

def test_parameter_counts_exact():
    assert n_params(meta_model(num_classes=0)) == 28_887_088
    assert n_params(meta_model(num_classes=400)) == 29_706_688
    assert n_params(meta_model()) == 29_706_688  # default head: Kinetics-400


@pytest.mark.parametrize("classes, head", [(400, 819_600), (600, 1_229_400), (51, 104_499)])
def test_head_parameters(classes, head):
    assert n_params(meta_model(num_classes=classes)) - 28_887_088 == head


def test_parameters_per_stage_and_position_maps():
    m = meta_model(num_classes=0)
    stem = sum(n_params(getattr(m, k)) for k in ("conv1", "bn1"))
    stages = [n_params(s) for s in m.stages()]
    assert [stem] + stages == [76_928, 497_184, 1_668_224, 8_824_768, 17_819_984]
    pos = sum(x.pos_embed.numel() for x in m.modules() if isinstance(x, IOIGate))
    assert pos == 3 * 16 * 56 ** 2 + 4 * 16 * 28 ** 2 + 6 * 16 * 14 ** 2 + 3 * 16 * 7 ** 2 == 221_872


def test_layout_is_resnet50_of_ctl_bottlenecks():
    m = meta_model(num_classes=0)
    assert [len(s) for s in m.stages()] == [3, 4, 6, 3]
    for s, (stage, planes, pos_dim) in enumerate(zip(m.stages(), (64, 128, 256, 512), (56, 28, 14, 7))):
        for i, block in enumerate(stage):
            assert isinstance(block, CTLBottleneck)
            assert block.conv1.out_channels == planes and block.conv3.out_channels == 4 * planes
            assert block.conv2.spatial_conv.pos_embed.shape[-2:] == (pos_dim, pos_dim)
            assert (block.downsample is not None) == (s > 0 and i == 0)
            assert (block.shortcut_conv is not None) == (i == 0)
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) \
        == (48, 64, (5, 5), (2, 2), (2, 2)) and m.conv1.bias is None
    assert (m.maxpool.kernel_size, m.maxpool.stride, m.maxpool.padding) == (3, 2, 1)


def test_macs_of_a_16x224_clip():
    gmacs = count_macs(meta_model().eval(), torch.empty(1, 3, 16, 224, 224, device="meta")) / 1e9
    assert gmacs == pytest.approx(5.48, rel=0.01)
    assert gmacs == pytest.approx(5.483, rel=0.001)  # spec §3: torch FlopCounterMode 10.966 GFLOP


def test_mini_is_the_same_design_scaled_down():
    m = meta_model("squeezetime_mini", num_classes=0)
    assert 0.6e6 <= n_params(m) <= 0.8e6
    assert [len(s) for s in m.stages()] == [1, 1, 1, 1]
    assert [s[0].conv1.out_channels for s in m.stages()] == [16, 32, 64, 128]
    assert m.conv1.in_channels == 48 and m.conv1.kernel_size == (5, 5) and m.num_features == 512
    assert all(isinstance(s[0], CTLBottleneck) for s in m.stages())
    # position maps sized for its 64x64 default input: 16, 8, 4, 2
    assert [s[0].conv2.spatial_conv.pos_embed.shape[-1] for s in m.stages()] == [16, 8, 4, 2]
    gmacs = count_macs(m.eval(), torch.empty(1, 3, 16, 64, 64, device="meta")) / 1e9
    assert gmacs < 0.1  # CPU-sized


def test_registered_as_video_models():
    assert get_entry("squeezetime").task == get_entry("squeezetime_mini").task == "video"
    assert get_entry("squeezetime").input_size == (3, 16, 224, 224)
    assert get_entry("squeezetime_mini").input_size == (3, 16, 64, 64)
    import timm
    with torch.device("meta"):
        assert n_params(timm.create_model("squeezetime", num_classes=0)) == 28_887_088


# ---------------------------------------------------------------- forward behaviour

@pytest.mark.parametrize("frames, size", [(8, 112), (16, 160), (4, 96)])
def test_other_frame_counts_and_sizes(frames, size):
    torch.manual_seed(0)
    m = create_model("squeezetime_mini", num_frames=frames, num_classes=7).eval()
    assert m.conv1.in_channels == 3 * frames
    with torch.no_grad():
        y = m(torch.randn(2, 3, frames, size, size))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_full_model_at_8_frames_112px():
    torch.manual_seed(0)
    m = create_model("squeezetime", num_frames=8, num_classes=10).eval()
    with torch.no_grad():
        y = m(torch.randn(1, 3, 8, 112, 112))
    assert y.shape == (1, 10) and torch.isfinite(y).all()


def test_stage_shapes_at_224_and_256_on_meta():
    m = meta_model(features_only=True).eval()
    for size, sides in ((224, (56, 28, 14, 7)), (256, (64, 32, 16, 8))):
        maps = m(torch.empty(1, 3, 16, size, size, device="meta"))
        assert [tuple(f.shape) for f in maps] == [(1, c, s, s) for c, s in zip((256, 512, 1024, 2048), sides)]
    assert [f["reduction"] for f in m.feature_info] == [4, 8, 16, 32]


def test_backbone_returns_pooled_features_and_head_is_gap_dropout_linear():
    torch.manual_seed(0)
    m = create_model("squeezetime_mini", num_classes=5).eval()
    assert isinstance(m.drop, nn.Dropout) and m.drop.p == 0.5
    x = torch.randn(2, 3, 16, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, 512, 2, 2)
        torch.testing.assert_close(m.forward_head(feats), F.linear(feats.mean((2, 3)), m.head.weight, m.head.bias))
        torch.testing.assert_close(m(x), m.forward_head(feats))
        backbone = create_model("squeezetime_mini", num_classes=0).eval()
        backbone.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("head.")})
        torch.testing.assert_close(backbone(x), feats.mean((2, 3)))
    m.reset_classifier(3)
    assert m.get_classifier().out_features == 3


def test_wrong_frame_count_is_a_user_error_naming_the_shape():
    m = create_model("squeezetime_mini")
    with pytest.raises(sqt.ClipShapeError, match=r"\(1, 3, 8, 64, 64\)"):
        m(torch.randn(1, 3, 8, 64, 64))


def test_channels_last_and_bf16_autocast():
    torch.manual_seed(0)
    m = create_model("squeezetime_mini", num_classes=6).eval()
    x = torch.randn(2, 3, 16, 80, 80)  # 80 px: position maps are resized in every stage
    with torch.no_grad():
        ref = m(x)
        cl = m.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x), ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last_3d)), ref,
                                   rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = cl(x)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.05 * ref.abs().max() + 0.05


def test_trains_with_batch_statistics():
    torch.manual_seed(0)
    m = create_model("squeezetime_mini", num_classes=4).train()
    loss = F.cross_entropy(m(torch.randn(2, 3, 16, 64, 64)), torch.tensor([0, 3]))
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())


# ---------------------------------------------------------------- init and norms (spec §2.5, §3)

def test_official_init_and_batchnorm_defaults():
    torch.manual_seed(0)
    m = create_model("squeezetime")
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(bns) == 104 and all(b.eps == 1e-5 and b.momentum == 0.1 for b in bns)  # nn.BatchNorm2d defaults
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    assert m.head.weight.std().item() == pytest.approx(0.01, rel=0.05) and torch.all(m.head.bias == 0)
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k))
    w = m.layer3[0].conv2.spatial_conv.short_conv.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.05)
    w = m.layer3[0].conv1.weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.05)
    pos = m.layer1[0].conv2.spatial_conv.pos_embed  # (1, 16, 56, 56): fan_out = 1 * 56 * 56
    assert pos.std().item() == pytest.approx(math.sqrt(2) / 56, rel=0.05)


# ---------------------------------------------------------------- official checkpoints (spec §6, §9)

def test_every_official_key_maps_to_our_model_with_its_shape():
    keys = official_keys()
    ours = {k: tuple(v.shape) for k, v in meta_model(num_classes=0).state_dict().items()}
    mapped = {sqt.official_to_ours("backbone." + k): shape for k, shape in keys.items()}
    assert len(mapped) == len(keys) == 755
    assert mapped == ours
    assert sqt.official_to_ours("cls_head.fc_cls.weight") == "head.weight"
    assert sqt.official_to_ours("backbone.net.layer1.0.conv2.spatial_conv.pos_embed") \
        == "layer1.0.conv2.spatial_conv.pos_embed"


def official_state(num_classes=400, seed=0) -> dict[str, torch.Tensor]:
    """A random state dict in the official mmaction2 layout, built from the key table alone."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_keys().items():
        if name.endswith("num_batches_tracked"):
            state["backbone." + name] = torch.randint(0, 1000, shape, generator=g)
        else:
            state["backbone." + name] = torch.randn(shape, generator=g)
    if num_classes:
        state["cls_head.fc_cls.weight"] = torch.randn(num_classes, 2048, generator=g)
        state["cls_head.fc_cls.bias"] = torch.randn(num_classes, generator=g)
    return state


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """An mmaction2-style checkpoint file ({"meta": ..., "state_dict": ...}) and the state it holds."""
    state = official_state()
    path = tmp_path_factory.mktemp("sqt") / "SqueezeTime_K400_71.64.pth"
    torch.save({"meta": {"epoch": 100, "config": "model = dict(...)"}, "state_dict": state}, path)
    return path, state


@pytest.fixture(scope="module")
def model400():
    with torch.device("meta"):
        m = create_model("squeezetime")
    return m.to_empty(device="cpu")


def assert_loaded(model, state):
    own = model.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(own[sqt.official_to_ours(key)], value, rtol=0, atol=0)


def test_official_checkpoint_round_trips(official_file, model400):
    path, state = official_file
    assert sqt.is_official_checkpoint(path)
    sqt.load_official(model400, path)
    assert_loaded(model400, state)
    converted = sqt.convert_official(path)
    assert set(converted) == set(model400.state_dict())


def test_plain_state_dicts_load_too(official_file, model400, tmp_path):
    _, state = official_file
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)  # no {"state_dict": ...} wrapper
    sqt.load_official(model400, plain)
    assert_loaded(model400, state)
    wrapped = tmp_path / "net.pth"  # the `backbone.net.` prefix of spec §6
    shifted = {k.replace("backbone.", "backbone.net.", 1): v * 2 for k, v in state.items()}
    torch.save({"state_dict": shifted}, wrapped)
    sqt.load_official(model400, wrapped)
    assert_loaded(model400, {k: v * 2 for k, v in state.items()})


def test_converted_weights_save_as_safetensors(official_file, model400, tmp_path):
    path, state = official_file
    sqt.load_official(model400, path)
    out = tmp_path / "model.safetensors"
    save_weights(model400, out)
    fresh = create_model("squeezetime")
    load_weights(fresh, out)
    assert_loaded(fresh, state)
    assert not sqt.is_official_checkpoint(out)


def test_missing_key_is_named(tmp_path, model400):
    state = official_state()
    del state["backbone.layer3.4.conv2.spatial_conv.pos_embed"]
    path = tmp_path / "missing.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"missing 1 keys: layer3\.4\.conv2\.spatial_conv\.pos_embed$"):
        sqt.load_official(model400, path)
    sqt.load_official(model400, path, strict=False)  # allowed when asked for; the rest is loaded
    assert_loaded(model400, state)


def test_unexpected_key_is_named(tmp_path, model400):
    state = official_state()
    state["backbone.layer4.3.conv1.weight"] = torch.zeros(512, 2048, 1, 1)
    path = tmp_path / "unexpected.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=r"unexpected 1 keys: backbone\.layer4\.3\.conv1\.weight$"):
        sqt.load_official(model400, path)


def test_every_bad_key_is_named_in_one_message(tmp_path, model400):
    state = official_state()
    dropped = [k for k in state if k.startswith("backbone.layer2.")]  # far more than 10
    for k in dropped:
        del state[k]
    extra = [f"backbone.extra{i}.weight" for i in range(12)]
    state.update({k: torch.zeros(1) for k in extra})
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        sqt.load_official(model400, path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    assert f"missing {len(dropped)} keys" in msg and f"unexpected {len(extra)} keys" in msg
    assert all(k[len("backbone."):] in msg for k in dropped)
    assert all(k in msg for k in extra)


def test_head_size_mismatch_is_named(tmp_path, model400):
    path = tmp_path / "k600.pth"
    torch.save({"state_dict": official_state(num_classes=600)}, path)
    with pytest.raises(CheckpointError, match=r"cls_head\.fc_cls\.weight \(600, 2048\) != \(400, 2048\)"):
        sqt.load_official(model400, path)


def test_backbone_checkpoint_needs_a_backbone_model(tmp_path):
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": official_state(num_classes=0)}, path)
    with torch.device("meta"):
        m = create_model("squeezetime", num_classes=0)
    m = m.to_empty(device="cpu")
    sqt.load_official(m, path)
    with pytest.raises(CheckpointError, match="missing 2 keys: head.weight, head.bias"):
        sqt.load_official(meta_model().to_empty(device="cpu"), path)


def test_pickles_carrying_code_are_refused(tmp_path, model400):
    path = tmp_path / "code.pth"
    torch.save({"state_dict": {}, "meta": {"obj": nn.ReLU()}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        sqt.load_official(model400, path)
