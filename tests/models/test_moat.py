"""MOAT / tiny-MOAT models, registry and weights I/O; numbers from /work/shared/specs/moat.md."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mobilezoo  # noqa: F401  (registers the models in timm)
from mobilezoo.deploy.profile import count_macs  # FlopCounterMode / 2
from mobilezoo.layers import DropPath
from mobilezoo.models import (
    CheckpointError,
    UnknownModelError,
    create_model,
    list_models,
    load_weights,
    save_weights,
)

NAMES = ["moat_0", "moat_1", "moat_2", "moat_3", "moat_4",
         "tiny_moat_0", "tiny_moat_1", "tiny_moat_2", "tiny_moat_3"]
# spec §2.2: exact params (1000 classes) with / without rel-PE; stage widths; blocks per stage
PARAMS = {
    "moat_0": (27_846_892, 27_777_544), "moat_1": (41_598_448, 41_467_864),
    "moat_2": (73_422_408, 73_248_296), "moat_3": (189_958_040, 189_536_280),
    "moat_4": (483_214_184, 482_539_368), "tiny_moat_0": (3_355_348, 3_332_232),
    "tiny_moat_1": (5_122_895, 5_094_000), "tiny_moat_2": (9_772_741, 9_732_288),
    "tiny_moat_3": (19_534_390, 19_476_600),
}
WIDTHS = {"moat_0": (96, 192, 384, 768), "tiny_moat_0": (32, 64, 128, 256),
          "tiny_moat_3": (80, 160, 320, 640)}
DEPTHS = {"moat_0": (2, 3, 7, 2), "moat_1": (2, 6, 14, 2), "moat_2": (2, 6, 14, 2),
          "moat_3": (2, 12, 28, 2), "moat_4": (2, 12, 28, 2), "tiny_moat_0": (2, 3, 7, 2),
          "tiny_moat_1": (2, 3, 7, 2), "tiny_moat_2": (2, 3, 7, 2), "tiny_moat_3": (2, 3, 7, 2)}
# spec §4: drop-path rate (1 - survival) of each released config
DROP = {"moat_0": 0.2, "moat_1": 0.3, "moat_2": 0.3, "moat_3": 0.6, "moat_4": 0.7,
        "tiny_moat_0": 0.0, "tiny_moat_1": 0.0, "tiny_moat_2": 0.0, "tiny_moat_3": 0.1}


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def seeded(name, seed=0, **kw):
    torch.manual_seed(seed)
    return create_model(name, **kw).eval()


# ---------------------------------------------------------------- size and cost

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rel_pos", [True, False])
def test_parameter_count_exact(name, rel_pos):
    m = meta_model(name, rel_pos=rel_pos)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name][0 if rel_pos else 1]


# (name, resolution, [ME] GMACs of spec §7, reported no-PE FLOPs (B) or None)
MACS = [
    ("tiny_moat_0", 224, 0.78, 0.8), ("tiny_moat_1", 224, 1.18, 1.2),
    ("tiny_moat_2", 224, 2.24, 2.3), ("tiny_moat_3", 224, 4.46, None),
    ("moat_0", 224, 5.64, 5.7), ("moat_1", 224, 9.00, 9.1), ("moat_2", 224, 17.05, 17.2),
    ("moat_3", 224, 44.55, None), ("moat_2", 384, 53.28, 53.8), ("moat_4", 512, 636.27, 640.6),
    ("tiny_moat_0", 256, 1.04, 1.1), ("tiny_moat_3", 256, 5.90, 6.0),
]


@pytest.mark.parametrize("name, res, me, reported", MACS)
def test_macs(name, res, me, reported):
    m = meta_model(name).eval()
    gmacs = count_macs(m, torch.empty(1, 3, res, res, device="meta")) / 1e9
    assert gmacs == pytest.approx(me, rel=0.01)
    if reported is not None:
        assert abs(gmacs - reported) <= 0.03 * reported + 0.05


# ---------------------------------------------------------------- forward behaviour

def test_window_14_7_equals_global_at_224_but_not_at_448():
    glob = seeded("tiny_moat_0")
    win = create_model("tiny_moat_0", window_size=(None, None, 14, 7)).eval()
    win.load_state_dict(glob.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(win(x), glob(x), rtol=1e-5, atol=1e-5)
        x = torch.randn(1, 3, 448, 448)
        a, b = win(x), glob(x)
    assert a.shape == b.shape == (1, 1000)
    assert (a - b).abs().max() > 1e-3  # stage 3 is 28x28: four 14x14 windows != global


@pytest.mark.parametrize("hw", [(256, 256), (320, 448)])
def test_other_input_sizes(hw):
    m = seeded("tiny_moat_0", num_classes=7)
    with torch.no_grad():
        y = m(torch.randn(1, 3, *hw))
    assert y.shape == (1, 7) and torch.isfinite(y).all()


def test_features_only_are_gelu_of_stage_outputs():
    cls = seeded("tiny_moat_0")
    feat = create_model("tiny_moat_0", features_only=True).eval()
    own = feat.state_dict()
    feat.load_state_dict({k: v for k, v in cls.state_dict().items() if k in own})
    stage_out = []
    for stage in cls.stages:
        stage.register_forward_hook(lambda mod, inp, out: stage_out.append(out))
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        cls(x)
        maps = feat(x)
    assert len(maps) == 4 and len(stage_out) == 4
    for f, s, stride, width in zip(maps, stage_out, (4, 8, 16, 32), WIDTHS["tiny_moat_0"], strict=True):
        assert f.shape == (2, width, 64 // stride, 96 // stride)
        torch.testing.assert_close(f, F.gelu(s), rtol=1e-5, atol=1e-6)
    sel = create_model("tiny_moat_0", features_only=True, out_indices=(1, 3)).eval()
    sel.load_state_dict(feat.state_dict())
    with torch.no_grad():
        picked = sel(x)
    assert len(picked) == 2
    torch.testing.assert_close(picked[0], maps[1])
    torch.testing.assert_close(picked[1], maps[3])


def test_head_pools_then_layer_norm():
    m = seeded("tiny_moat_0", num_classes=5)
    with torch.no_grad():
        m.norm.weight.normal_(1, 0.5)
        m.norm.bias.normal_(0, 0.5)
        feats = torch.randn(2, 256, 3, 4)  # stage-4 map
        pooled = F.layer_norm(feats.mean((2, 3)), (256,), m.norm.weight, m.norm.bias, 1e-5)
        torch.testing.assert_close(m.forward_head(feats),
                                   F.linear(pooled, m.head.weight, m.head.bias))
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_features_only_meta_widths():
    maps = meta_model("moat_0", features_only=True)(torch.empty(1, 3, 224, 224, device="meta"))
    assert [tuple(f.shape) for f in maps] == [(1, c, 224 // s, 224 // s)
                                             for c, s in zip(WIDTHS["moat_0"], (4, 8, 16, 32), strict=True)]


# ---------------------------------------------------------------- structure and init

def block_drop_rates(model):
    """Drop-path probabilities per block, in global block order (one list per block)."""
    return [[m.drop_prob for m in block.modules() if isinstance(m, DropPath)]
            for stage in model.stages for block in stage]


@pytest.mark.parametrize("name, override", [(n, None) for n in NAMES]
                         + [("tiny_moat_0", 0.25), ("moat_0", 0.0)])
def test_drop_path_schedule(name, override):
    m = meta_model(name, drop_path_rate=override)
    rate = DROP[name] if override is None else override
    per_block = block_drop_rates(m)
    n = sum(DEPTHS[name])
    stage_of = [s for s, d in enumerate(DEPTHS[name]) for _ in range(d)]
    assert len(per_block) == n
    for i, rates in enumerate(per_block):
        # MBConv blocks have one residual, MOAT blocks two (MBConv and attention), same rate
        assert len(rates) == (1 if stage_of[i] < 2 else 2)
        assert rates == pytest.approx([rate * i / n] * len(rates), abs=1e-9)


def test_norms_and_activations():
    m = meta_model("moat_0")
    bns = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) > 40
    assert all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    lns = [x for x in m.modules() if isinstance(x, nn.LayerNorm)]
    assert len(lns) == 7 + 2 + 1 and all(ln.eps == 1e-5 for ln in lns)
    gelus = [x for x in m.modules() if isinstance(x, nn.GELU)]
    # stem + (expand, depthwise) of each of the 14 blocks
    assert len(gelus) == 1 + 2 * 14 and all(g.approximate == "none" for g in gelus)
    assert sum(isinstance(x, nn.SiLU) for x in m.modules()) == 2 + 3  # SE in stages 1-2 only
    assert not any(isinstance(x, (nn.ReLU, nn.Hardswish, nn.Dropout)) for x in m.modules())


def test_init_normal_002_and_zero_bias():
    m = seeded("tiny_moat_0")
    convs = [x for x in m.modules() if isinstance(x, (nn.Conv2d, nn.Linear))]
    big = max(convs, key=lambda c: c.weight.numel()).weight.detach()
    assert big.numel() > 200_000
    assert big.std().item() == pytest.approx(0.02, rel=0.02)
    assert abs(big.mean().item()) < 5e-4
    assert big.abs().max().item() > 0.07  # plain normal, not truncated at 2 std
    for c in convs:
        if c.weight.numel() >= 5000:
            assert c.weight.std().item() == pytest.approx(0.02, rel=0.1)
        if c.bias is not None:
            assert not c.bias.any()
    tables = [p for n, p in m.named_parameters() if p.dim() == 3]
    assert len(tables) == 9 and all(t.std().item() == pytest.approx(0.02, rel=0.15) for t in tables)


# ---------------------------------------------------------------- registry and timm

def test_timm_create_model():
    import timm  # `import mobilezoo` (top of this file) registered the models in timm

    with torch.device("meta"):
        m = timm.create_model("moat_0")
    assert sum(p.numel() for p in m.parameters()) == PARAMS["moat_0"][0]
    small = timm.create_model("tiny_moat_0", num_classes=10).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    with pytest.raises(ValueError):
        timm.create_model("tiny_moat_0", pretrained=True)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError) as e:
        create_model("moat_9")
    assert re.search(r"moat_[0-4]", str(e.value))


def test_list_models():
    listed = list_models("classify")
    assert set(NAMES) <= set(listed) and listed == sorted(listed)
    assert not set(NAMES) & set(list_models("no-such-task"))


# ---------------------------------------------------------------- weights

def test_save_load_round_trip(tmp_path):
    a = seeded("tiny_moat_0", seed=0)
    path = tmp_path / "model.safetensors"
    save_weights(a, path)
    b = seeded("tiny_moat_0", seed=1)
    load_weights(b, path)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    c = create_model("tiny_moat_0", checkpoint=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(c(x), a(x), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_load_into_other_width_names_key(tmp_path, fmt):
    small = create_model("tiny_moat_0")
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        save_weights(small, path)
    else:  # a plain tensor dict saved by torch is accepted too (weights only)
        torch.save(small.state_dict(), path)
    other = create_model("tiny_moat_1")
    theirs = small.state_dict()
    mismatching = [k for k, v in other.state_dict().items() if theirs[k].shape != v.shape]
    assert mismatching
    with pytest.raises(CheckpointError) as e:
        load_weights(other, path)
    assert any(k in str(e.value) for k in mismatching)
    load_weights(create_model("tiny_moat_0"), path)  # while the right model loads it


class Opaque:
    """An arbitrary picklable object that is not a tensor."""

    def __init__(self):
        self.payload = [1, 2, 3]


def _touch(path):
    open(path, "w").close()


class Exploit:
    """Unpickling this would run `_touch(marker)`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


@pytest.mark.parametrize("kind", ["instance", "code"])
def test_pickle_with_objects_is_refused(tmp_path, kind):
    marker = tmp_path / "executed"
    model = create_model("tiny_moat_0")
    state = dict(model.state_dict())
    state["extra"] = Opaque() if kind == "instance" else Exploit(str(marker))
    path = tmp_path / "model.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError):
        load_weights(model, path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "missing.safetensors"])
def test_unreadable_file_is_checkpoint_error(tmp_path, name):
    path = tmp_path / name
    if not name.startswith("missing"):
        path.write_bytes(b"\x00not a weights file" * 8)
    with pytest.raises(CheckpointError):
        load_weights(create_model("tiny_moat_0"), path)


def test_window_attention_backbone_takes_any_input_size():
    # 513 x 513 (DeepLab's crop): maps of 33 and 17 at strides 16 and 32, padded to whole 14 / 7 windows
    backbone = create_model("tiny_moat_0", features_only=True, window_size=[None, None, 14, 7]).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 513, 513))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 129, 129), (64, 65, 65), (128, 33, 33), (256, 17, 17)]
    assert [i["reduction"] for i in backbone.feature_info] == [4, 8, 16, 32]
    assert all(torch.isfinite(f).all() for f in feats)
