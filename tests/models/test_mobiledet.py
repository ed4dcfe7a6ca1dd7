"""MobileDet backbones + SSDLite detector against the spec (/work/shared/specs/mobiledets.md).

The layer tables (§2.2-2.5), counts (§2.6), anchors (§3.2), matching/coding (§3.4), loss (§3.5) and
post-processing (§3.6) are transcribed or recomputed here from the spec; nothing below is copied
from the implementation's output. Backbone layers are read through an execution trace.
"""
import copy
import json
import math
from fractions import Fraction
from functools import lru_cache

import pytest
import torch
from torch import nn

import mobilezoo
from mobilezoo.deploy.profile import count_macs
from mobilezoo.errors import UserError
from mobilezoo.models.mobiledet import load_arch
from mobilezoo.models.ssdlite import SSDLite

VARIANTS = ("cpu", "dsp", "edgetpu", "gpu")
ACTS = (nn.ReLU6, nn.Hardswish, nn.ReLU, nn.SiLU, nn.GELU, nn.Hardsigmoid, nn.Sigmoid)

# ------------------------------------------------------------------ spec tables (§2.2 - §2.5)
# columns: #, type, k, s, e | (s_in,s_out), in, out, hidden | r_in->r_out, residual (Y/N)
SPEC_TABLES = {
    "cpu": """
        0 conv 3 2 - 3 16 - N
        1 ibn_noexp 3 1 1 16 8 16 N
        2 ibn 3 2 4 8 16 32 N
        3 ibn 3 2 8 16 32 128 N
        4 ibn 3 1 4 32 32 128 Y
        5 ibn 3 1 4 32 32 128 Y
        6 ibn 3 1 4 32 32 128 Y
        7 ibn 5 2 8 32 72 256 N
        8 ibn 3 1 8 72 72 576 Y
        9 ibn 5 1 4 72 72 288 Y
        10 ibn 3 1 4 72 72 288 Y
        11 ibn 3 1 8 72 72 576 N
        12 ibn 3 1 8 72 72 576 Y
        13 ibn 3 1 8 72 72 576 Y
        14 ibn 3 1 8 72 72 576 Y
        15 ibn 5 2 8 72 104 576 N
        16 ibn 5 1 4 104 104 416 Y
        17 ibn 5 1 4 104 104 416 Y
        18 ibn 3 1 4 104 104 416 Y
        19 ibn 3 1 8 104 144 832 N
    """,
    "dsp": """
        0 conv 3 2 - 3 32 - N
        1 ibn_noexp 3 1 1 32 24 32 N
        2 fused 3 2 4 24 32 96 N
        3 fused 3 1 4 32 32 128 Y
        4 ibn 3 1 4 32 32 128 Y
        5 tucker 3 1 0.25,0.75 32 32 8->24 Y
        6 fused 3 2 8 32 64 256 N
        7 ibn 3 1 4 64 64 256 Y
        8 fused 3 1 4 64 64 256 Y
        9 fused 3 1 4 64 64 256 Y
        10 fused 3 2 8 64 120 512 N
        11 ibn 3 1 4 120 120 480 Y
        12 ibn 3 1 8 120 120 960 Y
        13 ibn 3 1 8 120 120 960 Y
        14 fused 3 1 8 120 144 960 N
        15 ibn 3 1 8 144 144 1152 Y
        16 ibn 3 1 8 144 144 1152 Y
        17 ibn 3 1 8 144 144 1152 Y
        18 ibn 3 2 4 144 160 576 N
        19 ibn 3 1 4 160 160 640 Y
        20 fused 3 1 4 160 160 640 Y
        21 tucker 3 1 0.75,0.75 160 160 120->120 Y
        22 ibn 3 1 8 160 240 1280 N
    """,
    "edgetpu": """
        0 conv 3 2 - 3 32 - N
        1 tucker 3 1 0.25,0.75 32 16 8->16 N
        2 fused 3 2 8 16 16 128 N
        3 fused 3 1 4 16 16 64 Y
        4 fused 3 1 8 16 16 128 Y
        5 fused 3 1 4 16 16 64 Y
        6 fused 5 2 8 16 40 128 N
        7 fused 3 1 4 40 40 160 Y
        8 fused 3 1 4 40 40 160 Y
        9 fused 3 1 4 40 40 160 Y
        10 ibn 3 2 8 40 72 320 N
        11 ibn 3 1 8 72 72 576 Y
        12 fused 3 1 4 72 72 288 Y
        13 fused 3 1 4 72 72 288 Y
        14 ibn 5 1 8 72 96 576 N
        15 ibn 5 1 8 96 96 768 Y
        16 ibn 3 1 8 96 96 768 Y
        17 ibn 3 1 8 96 96 768 Y
        18 ibn 5 2 8 96 120 768 N
        19 ibn 3 1 8 120 120 960 Y
        20 ibn 5 1 4 120 120 480 Y
        21 ibn 3 1 8 120 120 960 Y
        22 ibn 5 1 8 120 384 960 N
    """,
    "gpu": """
        0 conv 3 2 - 3 32 - N
        1 tucker 3 1 0.25,0.25 32 16 8->8 N
        2 fused 3 2 8 16 32 128 N
        3 tucker 3 1 0.25,0.25 32 32 8->8 Y
        4 tucker 3 1 0.25,0.25 32 32 8->8 Y
        5 tucker 3 1 0.25,0.25 32 32 8->8 Y
        6 fused 3 2 8 32 64 256 N
        7 fused 3 1 8 64 64 512 Y
        8 fused 3 1 8 64 64 512 Y
        9 fused 3 1 4 64 64 256 Y
        10 fused 3 2 8 64 128 512 N
        11 fused 3 1 4 128 128 512 Y
        12 fused 3 1 4 128 128 512 Y
        13 fused 3 1 4 128 128 512 Y
        14 fused 3 1 8 128 128 1024 N
        15 fused 3 1 8 128 128 1024 Y
        16 fused 3 1 8 128 128 1024 Y
        17 fused 3 1 8 128 128 1024 Y
        18 fused 3 2 4 128 128 512 N
        19 fused 3 1 4 128 128 512 Y
        20 fused 3 1 4 128 128 512 Y
        21 fused 3 1 4 128 128 512 Y
        22 ibn 3 1 8 128 384 1024 N
    """,
}
# §2.6: C4 / C5 widths; §2.6 counts (params + BN moving stats, 91 class slots) and MAdds
ENDPOINTS = {"cpu": (72, 144), "dsp": (144, 240), "edgetpu": (96, 384), "gpu": (128, 384)}
PARAM_COUNTS = {"cpu": 4_205_423, "dsp": 7_159_343, "edgetpu": 4_196_095, "gpu": 13_109_151}
OFFICIAL_PARAMS = {"cpu": 4.21e6, "dsp": 7.16e6, "edgetpu": 4.20e6, "gpu": 13.11e6}
OFFICIAL_MADDS = {"cpu": 0.45e9, "dsp": 2.82e9, "edgetpu": 1.53e9, "gpu": 5.07e9}
EXTRA_DEPTHS = (512, 256, 256, 128)


def parse_table(text: str) -> list[dict]:
    rows = []
    for i, line in enumerate(text.strip().splitlines()):
        n, kind, k, s, e, cin, cout, hidden, res = line.split()
        assert int(n) == i
        row = dict(type=kind, k=int(k), s=int(s), cin=int(cin), cout=int(cout), residual=res == "Y")
        if kind == "tucker":
            row["ratios"] = tuple(float(r) for r in e.split(","))
            row["hidden"] = tuple(int(h) for h in hidden.split("->"))
        elif kind != "conv":
            row["e"] = int(e)
            row["hidden"] = int(hidden)
        rows.append(row)
    return rows


TABLES = {v: parse_table(t) for v, t in SPEC_TABLES.items()}


def ref_scale(c: int, m) -> int:
    """Spec §1.2: max(8, 8 * floor(c*m/8 + 1/2)), exact."""
    x = Fraction(c) * Fraction(m) / 8 + Fraction(1, 2)
    return max(8, 8 * (x.numerator // x.denominator))


@pytest.mark.parametrize("variant", VARIANTS)
def test_spec_tables_are_self_consistent(variant):
    # guards the transcription: widths chain, hidden = in * e, Tucker ranks from the §1.2 rule
    rows = TABLES[variant]
    assert rows[0]["cin"] == 3
    for prev, row in zip(rows, rows[1:]):
        assert row["cin"] == prev["cout"]
    for row in rows:
        if row["type"] in ("ibn", "fused"):
            assert row["hidden"] == row["cin"] * row["e"]
        elif row["type"] == "ibn_noexp":
            assert row["hidden"] == row["cin"]
        elif row["type"] == "tucker":
            assert row["hidden"] == (ref_scale(row["cin"], row["ratios"][0]),
                                     ref_scale(row["cout"], row["ratios"][1]))
        if row["residual"]:
            assert row["s"] == 1 and row["cin"] == row["cout"]
    assert math.prod(r["s"] for r in rows) == 32
    assert rows[-1]["cout"] == ENDPOINTS[variant][1]


# ------------------------------------------------------------------------------ helpers


@lru_cache(maxsize=None)
def build(variant: str = "cpu", **kwargs) -> SSDLite:
    """One construction per configuration (TF-style truncated-normal init is slow on CPU).
    Shared between tests: read it, or `fresh()` a copy to change it."""
    torch.manual_seed(0)
    return mobilezoo.create_model(f"ssdlite_mobiledet_{variant}", **kwargs).eval()


def detector(variant: str) -> SSDLite:
    """The §2.6 configuration: 90 classes + background slot."""
    return build(variant, num_classes=90, background_class=True)


def small_detector(variant: str = "cpu", **kwargs) -> SSDLite:
    return build(variant, num_classes=3, **kwargs)


def fresh(background_class: bool = False) -> SSDLite:
    """A private copy to patch: CPU with 3 classes, or with 90 classes + background slot."""
    return copy.deepcopy(detector("cpu") if background_class else small_detector())


def trace(module: nn.Module, x: torch.Tensor) -> list:
    events = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: events.append(
        (mod, tuple(inp[0].shape), tuple(out.shape))))
        for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return events


def signature(events) -> list[str]:
    out = []
    for m, inp, _ in events:
        if isinstance(m, nn.Conv2d):
            k, s = m.kernel_size[0], m.stride[0]
            assert m.kernel_size == (k, k) and m.stride == (s, s)
            if m.groups > 1:
                assert m.groups == m.in_channels == m.out_channels
            tag = f"{'dw' if m.groups > 1 else 'conv'}{k}x{k}/s{s}:{m.in_channels}->{m.out_channels}"
            out.append(tag + ("+b" if m.bias is not None else "") + ("@gap" if inp[-2:] == (1, 1) else ""))
        elif isinstance(m, nn.BatchNorm2d):
            out.append("bn")
        elif isinstance(m, ACTS):
            out.append(type(m).__name__)
        elif not isinstance(m, nn.Identity):
            out.append(type(m).__name__)
    return out


def expected_signature(row: dict, act: str, se: bool) -> list[str]:
    k, s, cin, cout = row["k"], row["s"], row["cin"], row["cout"]
    if row["type"] == "conv":
        return [f"conv{k}x{k}/s{s}:{cin}->{cout}", "bn", act]
    h = row["hidden"]
    if row["type"] == "ibn_noexp":
        body = [f"dw{k}x{k}/s{s}:{cin}->{cin}", "bn", act]
    elif row["type"] == "ibn":
        body = [f"conv1x1/s1:{cin}->{h}", "bn", act, f"dw{k}x{k}/s{s}:{h}->{h}", "bn", act]
    elif row["type"] == "fused":
        body = [f"conv{k}x{k}/s{s}:{cin}->{h}", "bn", act]
    else:
        r_in, h = h
        body = [f"conv1x1/s1:{cin}->{r_in}", "bn", act, f"conv{k}x{k}/s{s}:{r_in}->{h}", "bn", act]
    if se:
        r = ref_scale(h, Fraction(1, 4))
        body += [f"conv1x1/s1:{h}->{r}+b@gap", act, f"conv1x1/s1:{r}->{h}+b@gap", "Sigmoid"]
    return body + [f"conv1x1/s1:{h}->{cout}", "bn"]


def adds_input(layer: nn.Module, cin: int) -> bool:
    """True if the layer adds its input: with the last BN zeroed the output is the input."""
    layer = copy.deepcopy(layer).eval()
    x = torch.randn(1, cin, 6, 6)
    bns = [m for m, _, _ in trace(layer, x) if isinstance(m, nn.BatchNorm2d)]
    nn.init.zeros_(bns[-1].weight)
    nn.init.zeros_(bns[-1].bias)
    with torch.no_grad():
        y = layer(x)
    if y.shape == x.shape and torch.allclose(y, x):
        return True
    assert torch.count_nonzero(y) == 0, "a zeroed projection must leave the shortcut or nothing"
    return False


# ----------------------------------------------------------------- backbones vs the tables


@pytest.mark.parametrize("variant", VARIANTS)
def test_backbone_matches_spec_table(variant):
    rows = TABLES[variant]
    backbone = detector(variant).backbone
    layers = list(backbone.layers)
    assert len(layers) == len(rows)
    cpu = variant == "cpu"
    act = "Hardswish" if cpu else "ReLU6"  # §1.1: hard-swish everywhere on CPU (stem included)
    for i, (row, layer) in enumerate(zip(rows, layers)):
        x = torch.randn(1, row["cin"], 12, 12)
        sig = signature(trace(layer, x))
        se = cpu and row["type"] != "conv"  # §2.2: SE in every CPU layer except the stem
        assert sig == expected_signature(row, act, se), f"{variant} layer {i}"
        with torch.no_grad():
            assert layer(x).shape == (1, row["cout"], 12 // row["s"], 12 // row["s"]), i
        if row["type"] != "conv":
            assert adds_input(layer, row["cin"]) == row["residual"], f"{variant} layer {i} residual"
    # the backbone's full activation set
    acts = {type(m) for m in backbone.modules() if isinstance(m, ACTS)}
    assert acts == ({nn.Hardswish, nn.Sigmoid} if cpu else {nn.ReLU6})


def test_first_layer_of_a_block_is_not_residual():
    # §1.3 pitfall: CPU layer 11 and GPU layer 14 are same-shape but non-residual
    for variant, i, width in (("cpu", 11, 72), ("gpu", 14, 128)):
        layers = detector(variant).backbone.layers
        assert not adds_input(layers[i], width)
        assert adds_input(layers[i + 1], width)


def test_cpu_se_widths():
    # §2.2: SE hidden = round8(hidden / 4): 8 for 16 and 32, 32/128, 72/288, 144/576, 104/416, 208/832
    spec = {16: 8, 32: 8, 128: 32, 256: 64, 288: 72, 576: 144, 416: 104, 832: 208}
    backbone = detector("cpu").backbone
    for row, layer in zip(TABLES["cpu"][1:], list(backbone.layers)[1:]):
        convs = [m for m, i, _ in trace(layer, torch.randn(1, row["cin"], 8, 8))
                 if isinstance(m, nn.Conv2d) and i[-2:] == (1, 1)]
        assert [(c.in_channels, c.out_channels) for c in convs] == [
            (row["hidden"], spec[row["hidden"]]), (spec[row["hidden"]], row["hidden"])]


# ------------------------------------------------------------------------ BN, init, counts


def test_batchnorm_settings():
    model = small_detector()
    backbone_bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    backbone_ids = {id(m) for m in backbone_bns}
    other_bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in backbone_ids]
    assert backbone_bns and other_bns
    for bn in backbone_bns:  # §1.1: eps 0.01, decay 0.99
        assert (bn.eps, bn.momentum, bn.affine) == (0.01, 0.01, True)
    for bn in other_bns:  # extra layers and box predictor: eps 1e-3, decay 0.97
        assert (bn.eps, bn.momentum, bn.affine) == (1e-3, pytest.approx(0.03), True)
    # extras: 4 layers x 3 convs with BN; heads: 6 maps x 2 heads x 1 depthwise with BN
    assert len(other_bns) == 4 * 3 + 6 * 2


def _last_conv(head: nn.Module) -> nn.Conv2d:
    return [m for m in head.modules() if isinstance(m, nn.Conv2d)][-1]


def test_head_init_and_layout():
    model = detector("cpu")
    anchors_per_cell = [3, 6, 6, 6, 6, 6]
    assert len(model.cls_heads) == len(model.box_heads) == 6
    for a, ch, bh in zip(anchors_per_cell, model.cls_heads, model.box_heads):
        cls, box = _last_conv(ch), _last_conv(bh)
        assert cls.kernel_size == box.kernel_size == (1, 1)
        assert cls.out_channels == a * 91 and box.out_channels == a * 4
        assert torch.all(cls.bias == -4.6)  # class_prediction_bias_init
        assert torch.all(box.bias == 0)
    head_w = torch.cat([m.weight.flatten() for h in (*model.cls_heads, *model.box_heads)
                        for m in h.modules() if isinstance(m, nn.Conv2d)])
    # random_normal 0.03 (not truncated)
    assert head_w.std().item() == pytest.approx(0.03, rel=0.03)
    assert abs(head_w.mean().item()) < 1e-3
    assert head_w.abs().max().item() > 3 * 0.03
    extra_w = torch.cat([m.weight.flatten() for m in model.extras.modules() if isinstance(m, nn.Conv2d)])
    # truncated_normal 0.03: cut at 2 * 0.03, std 0.03 * 0.8796
    assert extra_w.abs().max().item() <= 0.06 + 1e-7
    assert extra_w.std().item() == pytest.approx(0.03 * 0.87962566, rel=0.03)


def test_backbone_init_is_truncated_he_normal():
    # §1.1: TF1 he_normal = truncated normal, std sqrt(2/fan_in)/0.8796 cut at 2 of those stds,
    # so the realised std is sqrt(2/fan_in); depthwise fan_in = k*k. Biases (SE) are 0.
    normalised = []
    for variant in VARIANTS:
        for m in detector(variant).backbone.modules():
            if not isinstance(m, nn.Conv2d):
                continue
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            if m.groups > 1:
                assert fan_in == m.kernel_size[0] ** 2
            w = m.weight.detach().flatten() / math.sqrt(2.0 / fan_in)
            assert w.abs().max().item() <= 2 / 0.87962566103423978 + 1e-5
            if w.numel() >= 20_000:
                assert w.std().item() == pytest.approx(1.0, rel=0.05)
            if m.bias is not None:
                assert torch.all(m.bias == 0)
            normalised.append(w)
    w = torch.cat(normalised)
    assert w.std().item() == pytest.approx(1.0, rel=0.01)
    assert abs(w.mean().item()) < 0.01
    assert w.abs().max().item() > 2.2  # cut at 2.27, not tighter


def _num_values(model: nn.Module) -> int:
    return sum(t.numel() for k, t in model.state_dict().items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_count(variant):
    model = detector(variant)
    n = _num_values(model)
    assert n == PARAM_COUNTS[variant]
    assert round(n, -4) == OFFICIAL_PARAMS[variant]  # 4.21M / 7.16M / 4.20M / 13.11M
    bn_stats = sum(m.running_mean.numel() + m.running_var.numel()
                   for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(p.numel() for p in model.parameters()) == n - bn_stats


@pytest.mark.parametrize("variant", VARIANTS)
def test_madds(variant):
    model = detector(variant)
    madds = count_macs(model.head_outputs, torch.zeros(1, 3, 320, 320))  # FlopCounterMode / 2
    assert madds == pytest.approx(OFFICIAL_MADDS[variant], rel=0.02)


def test_default_has_no_background_slot():
    model = small_detector()  # num_classes=3, background_class left at its default
    for a, ch in zip([3, 6, 6, 6, 6, 6], model.cls_heads):
        assert _last_conv(ch).out_channels == a * 3
    with torch.no_grad():
        _, logits, _ = model.head_outputs(torch.zeros(1, 3, 128, 128))
    assert logits.shape[-1] == 3


# ---------------------------------------------------------------------------- feature maps


@pytest.mark.parametrize("variant", VARIANTS)
def test_feature_map_shapes(variant):
    model = detector(variant)
    chans = [*ENDPOINTS[variant], *EXTRA_DEPTHS]
    with torch.no_grad():
        feats = model.features(torch.zeros(1, 3, 320, 320))
        assert [tuple(f.shape) for f in feats] == [(1, c, n, n) for c, n in zip(chans, (20, 10, 5, 3, 2, 1))]
        # [FET] shapes at H=640, W=320
        feats = model.features(torch.zeros(1, 3, 640, 320))
    hw = [(40, 20), (20, 10), (10, 5), (5, 3), (3, 2), (2, 1)]
    assert [tuple(f.shape) for f in feats] == [(1, c, *s) for c, s in zip(chans, hw)]


def test_backbone_maps_at_every_stride_on_request():
    # timm's convention: feature_info lists the last layer at each stride; out_indices picks the returned maps.
    torch.manual_seed(0)
    backbone = mobilezoo.create_model("mobiledet_cpu").eval()
    assert [f["reduction"] for f in backbone.feature_info] == [2, 4, 8, 16, 32] and backbone.out_indices == (3, 4)
    every = mobilezoo.create_model("mobiledet_cpu", out_indices=(0, 1, 2, 3, 4)).eval()
    every.load_state_dict(backbone.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps, default = every(x), backbone(x)
    info = every.feature_info
    assert [(m.shape[1], m.shape[-1]) for m in maps] == [(f["num_chs"], 64 // f["reduction"]) for f in info]
    assert all(torch.equal(a, b) for a, b in zip(default, maps[3:]))
    with pytest.raises(UserError, match=r"out_indices: expected indices of the maps at strides 2, 4, 8, 16, 32"):
        mobilezoo.create_model("mobiledet_cpu", out_indices=(5,))


def test_extra_layer_structure():
    # §2.6: 1x1 to d/2 -> depthwise 3x3 s2 -> 1x1 to d, all bias-free + BN + ReLU6
    model = detector("cpu")
    sig = signature([e for layer, cin in zip(model.extras, (144, 512, 256, 256))
                     for e in trace(layer, torch.randn(1, cin, 10, 10))])
    expected = []
    for cin, d in zip((144, 512, 256, 256), EXTRA_DEPTHS):
        expected += [f"conv1x1/s1:{cin}->{d // 2}", "bn", "ReLU6", f"dw3x3/s2:{d // 2}->{d // 2}", "bn",
                     "ReLU6", f"conv1x1/s1:{d // 2}->{d}", "bn", "ReLU6"]
    assert sig == expected
    # heads: depthwise 3x3 + BN + ReLU6, then a biased 1x1
    head = model.cls_heads[1]
    assert signature(trace(head, torch.randn(1, 144, 10, 10))) == [
        "dw3x3/s1:144->144", "bn", "ReLU6", "conv1x1/s1:144->546+b"]


# ---------------------------------------------------------------------------------- anchors

LAYER0_SPECS = [(0.1, 1.0), (0.2, 2.0), (0.2, 0.5)]
SCALES = [0.2 + 0.75 * k / 5 for k in range(6)] + [1.0]
ASPECTS = [1.0, 2.0, 0.5, 3.0, 0.3333]


def spec_box_specs(layer: int) -> list[tuple[float, float]]:
    if layer == 0:
        return LAYER0_SPECS
    return [(SCALES[layer], a) for a in ASPECTS] + [(math.sqrt(SCALES[layer] * SCALES[layer + 1]), 1.0)]


def spec_anchors(sizes, height: int, width: int) -> torch.Tensor:
    """§3.2 (+ TF's base_anchor_size scaling by min(H, W) for non-square inputs), pixel xyxy.
    Order: layer, y, x, box spec."""
    bh, bw = min(height, width) / height, min(height, width) / width
    out = []
    for layer, (fh, fw) in enumerate(sizes):
        for i in range(fh):
            for j in range(fw):
                cy, cx = (i + 0.5) / fh, (j + 0.5) / fw
                for s, ar in spec_box_specs(layer):
                    h, w = s / math.sqrt(ar) * bh, s * math.sqrt(ar) * bw
                    out.append([(cx - w / 2) * width, (cy - h / 2) * height,
                                (cx + w / 2) * width, (cy + h / 2) * height])
    return torch.tensor(out, dtype=torch.float64)


SIZES_320 = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]
SIZES_640x320 = [(40, 20), (20, 10), (10, 5), (5, 3), (3, 2), (2, 1)]


def model_anchors(model, height, width):
    with torch.no_grad():
        reg, logits, sizes = model.head_outputs(torch.zeros(1, 3, height, width))
    anchors = model.anchors(sizes, (height, width), torch.device("cpu"))
    assert reg.shape[1] == logits.shape[1] == anchors.shape[0]
    return [tuple(s) for s in sizes], anchors.double()


def test_anchor_count_and_values_320():
    sizes, anchors = model_anchors(small_detector(), 320, 320)
    assert sizes == SIZES_320
    assert anchors.shape == (2034, 4)
    assert 20 * 20 * 3 + (100 + 25 + 9 + 4 + 1) * 6 == 2034
    torch.testing.assert_close(anchors, spec_anchors(sizes, 320, 320), rtol=0, atol=1e-3)


def test_first_anchors_by_hand():
    _, a = model_anchors(small_detector(), 320, 320)
    c = 0.5 / 20 * 320  # = 8
    r2 = math.sqrt(2.0)
    expected = [  # (scale 0.1, ar 1), (0.2, 2), (0.2, 0.5); h = s/sqrt(ar), w = s*sqrt(ar)
        [c - 16, c - 16, c + 16, c + 16],
        [c - 0.1 * r2 * 320, c - 0.05 * r2 * 320, c + 0.1 * r2 * 320, c + 0.05 * r2 * 320],
        [c - 0.05 * r2 * 320, c - 0.1 * r2 * 320, c + 0.05 * r2 * 320, c + 0.1 * r2 * 320],
    ]
    torch.testing.assert_close(a[:3], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-3)
    assert a[0].tolist() == pytest.approx([-8, -8, 24, 24], abs=1e-4)
    # box spec fastest, then x, then y: anchor 3 is the next cell to the right, 60 the next row
    centre = (a[:, :2] + a[:, 2:]) / 2
    assert centre[3].tolist() == pytest.approx([24, 8], abs=1e-4)
    assert centre[60].tolist() == pytest.approx([8, 24], abs=1e-4)
    # layer 1 (10x10) starts at 1200 with 6 anchors per cell centred at (16, 16)
    c1 = 0.5 / 10 * 320
    assert torch.allclose(centre[1200:1206], torch.tensor([c1, c1], dtype=torch.float64), atol=1e-4)
    assert centre[1206].tolist() == pytest.approx([48, 16], abs=1e-4)
    side = lambda s: s * 320
    wh = a[1200:1206, 2:] - a[1200:1206, :2]
    expected_wh = [[side(0.35), side(0.35)], [side(0.35 * r2), side(0.35 / r2)],
                   [side(0.35 / r2), side(0.35 * r2)],
                   [side(0.35 * math.sqrt(3)), side(0.35 / math.sqrt(3))],
                   [side(0.35 * math.sqrt(0.3333)), side(0.35 / math.sqrt(0.3333))],
                   [side(math.sqrt(0.35 * 0.5)), side(math.sqrt(0.35 * 0.5))]]
    torch.testing.assert_close(wh, torch.tensor(expected_wh, dtype=torch.float64), rtol=0, atol=1e-3)
    # last layer (1x1, scale 0.95): interpolated scale sqrt(0.95 * 1.0)
    assert (a[-1, 2] - a[-1, 0]).item() == pytest.approx(math.sqrt(0.95) * 320, abs=1e-3)


def test_anchor_scales_option():
    # (min_scale, max_scale, lowest-layer square box), TF's config fields; default (0.2, 0.95, 0.1)
    _, a = model_anchors(small_detector(anchor_scales=(0.15, 0.9, 0.075)), 320, 320)
    assert a.shape == (2034, 4)
    assert a[0].tolist() == pytest.approx([8 - 12, 8 - 12, 8 + 12, 8 + 12], abs=1e-4)  # 0.075 * 320 = 24
    area = lambda box: ((box[2] - box[0]) * (box[3] - box[1])).item()
    assert area(a[1]) == pytest.approx((0.15 * 320) ** 2, rel=1e-5)  # (0.15, aspect 2)
    assert (a[1200, 2] - a[1200, 0]).item() == pytest.approx((0.15 + 0.75 / 5) * 320, abs=1e-3)
    assert (a[-1, 2] - a[-1, 0]).item() == pytest.approx(math.sqrt(0.9) * 320, abs=1e-3)


@pytest.mark.parametrize("kwargs, field", [({"anchor_scales": (0.1, 0.9)}, "anchor_scales"),
                                           ({"anchor_scales": (0.9, 0.2, 0.1)}, "anchor_scales"),
                                           ({"anchor_scales": (0.2, 0.9, 0.0)}, "anchor_scales"),
                                           ({"match_iou": 0.0}, "match_iou"), ({"match_iou": 1.5}, "match_iou"),
                                           ({"nms_iou": 0.0}, "nms_iou"), ({"nms_iou": 1.2}, "nms_iou")])
def test_bad_matching_or_anchor_options_name_the_field(kwargs, field):
    with pytest.raises(UserError, match=field):
        small_detector(**kwargs)


def test_anchors_are_not_clipped():
    _, a = model_anchors(small_detector(), 320, 320)
    assert a.min() < 0 and a.max() > 320
    # the 1x1 layer's (0.95, ar 3) box is 0.95*sqrt(3)*320 = 526 px wide
    wh = a[-6:, 2:] - a[-6:, :2]
    assert wh[3, 0].item() == pytest.approx(0.95 * math.sqrt(3) * 320, abs=1e-3)


def test_anchors_non_square_input():
    sizes, a = model_anchors(small_detector(), 640, 320)  # H=640, W=320
    assert sizes == SIZES_640x320
    n = 40 * 20 * 3 + (20 * 10 + 10 * 5 + 5 * 3 + 3 * 2 + 2 * 1) * 6
    assert n == 4038 and a.shape == (n, 4)
    torch.testing.assert_close(a, spec_anchors(sizes, 640, 320), rtol=0, atol=1e-3)
    # aspect-1 anchors are square in pixels (side s * min(H, W))
    assert a[0].tolist() == pytest.approx([-8, -8, 24, 24], abs=1e-4)
    start = 2400
    for layer, (fh, fw) in enumerate(sizes[1:], 1):
        wh = a[start:start + 6, 2:] - a[start:start + 6, :2]
        assert wh[0, 0].item() == pytest.approx(wh[0, 1].item(), abs=1e-4)
        assert wh[0, 0].item() == pytest.approx(SCALES[layer] * 320, abs=1e-3)
        assert wh[5, 0].item() == pytest.approx(wh[5, 1].item(), abs=1e-4)
        start += fh * fw * 6
    assert start == n


# ------------------------------------------------------------------------- box coder, matcher


def test_box_coder_by_hand_and_round_trip():
    coder = small_detector().box_coder
    anchor = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # xa = ya = 16, wa = ha = 32
    gt = torch.tensor([[4.0, 6.0, 40.0, 30.0]])      # x = 22, y = 18, w = 36, h = 24
    code = coder.encode_single(gt, anchor)[0].tolist()
    tx, ty = 10 * (22 - 16) / 32, 10 * (18 - 16) / 32
    tw, th = 5 * math.log(36 / 32), 5 * math.log(24 / 32)
    # torchvision order (tx, ty, tw, th); TF's is (ty, tx, th, tw) - the same coder (§3.4)
    assert code == pytest.approx([tx, ty, tw, th], abs=1e-5)
    torch.manual_seed(0)
    xy = torch.rand(50, 2) * 300
    anchors = torch.cat([xy, xy + 5 + torch.rand(50, 2) * 100], 1)
    xy = torch.rand(50, 2) * 300
    boxes = torch.cat([xy, xy + 5 + torch.rand(50, 2) * 100], 1)
    back = coder.decode_single(coder.encode_single(boxes, anchors), anchors)
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-3)


def test_matcher_hand_cases():
    matcher = small_detector().matcher
    iou = torch.tensor([
        # a0    a1    a2    a3    a4
        [0.50, 0.49, 0.30, 0.00, 0.60],   # gt0
        [0.10, 0.20, 0.40, 0.45, 0.70],   # gt1: best is a4 (0.70)
        [0.00, 0.00, 0.00, 0.30, 0.10],   # gt2: best IoU 0.30 < 0.5 -> still claims a3
    ])
    matched = matcher(iou)
    assert matched[0] == 0             # IoU 0.5 is a match
    assert matched[1] < 0 and matched[2] < 0  # 0.49 and 0.40 are unmatched (no ignore band below)
    assert matched[3] == 2             # forced: gt2's best anchor
    assert matched[4] == 1             # argmax over GTs
    # the unmatched anchors are negatives, not ignored: same code for 0.49 and 0.0
    only = matcher(torch.tensor([[0.49, 0.0, 0.9]]))
    assert only[0] == only[1] and only[0] < 0 and only[2] == 0


def test_match_iou_option_lowers_the_positive_threshold():
    iou = torch.tensor([[0.90, 0.45, 0.39]])
    assert small_detector().matcher(iou).tolist()[:2] == [0, -1]           # TF's 0.5
    assert small_detector(match_iou=0.4).matcher(iou).tolist() == [0, 0, -1]


# ------------------------------------------------------------------------------------ loss


def ref_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def ref_match(gt, anchors) -> torch.Tensor:
    """§3.4: IoU >= 0.5 -> argmax GT, else unmatched; each GT also claims its best anchor."""
    matched = torch.full((anchors.shape[0],), -1, dtype=torch.long)
    if gt.numel():
        iou = ref_iou(gt, anchors)
        best, arg = iou.max(0)
        matched[best >= 0.5] = arg[best >= 0.5]
        for g in range(gt.shape[0]):
            matched[iou[g].argmax()] = g
    return matched


def ref_encode(gt, a) -> torch.Tensor:
    wa, ha = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    xa, ya = a[:, 0] + wa / 2, a[:, 1] + ha / 2
    w, h = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    x, y = gt[:, 0] + w / 2, gt[:, 1] + h / 2
    return torch.stack([10 * (x - xa) / wa, 10 * (y - ya) / ha,
                        5 * torch.log(w / wa), 5 * torch.log(h / ha)], 1)


def focal(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """§3.5 TF convention: weight 0.75 on positives, 0.25 on negatives, gamma 2."""
    p = torch.sigmoid(z)
    pt = p * t + (1 - p) * (1 - t)
    return (0.75 * t + 0.25 * (1 - t)) * (1 - pt) ** 2 * -torch.log(pt)


def huber(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x ** 2, x.abs() - 0.5)


def loss_with_outputs(model, regression, logits, targets, size=(320, 320)):
    """Run the training forward with the head outputs replaced by the given tensors."""
    sizes = SIZES_320 if size == (320, 320) else SIZES_640x320
    model.head_outputs = lambda images: (regression, logits, sizes)
    model.train()
    return model(torch.zeros(regression.shape[0], 3, *size), targets)


@pytest.fixture
def loss_model():
    return fresh(background_class=True)


def test_focal_loss_hand_computation(loss_model):
    anchors = spec_anchors(SIZES_320, 320, 320).float()
    n = anchors.shape[0]
    # logits: background column 2.0, the 90 class columns -1.0 (so the positive's column matters)
    logits = torch.full((2, n, 91), -1.0)
    logits[..., 0] = 2.0
    regression = torch.zeros(2, n, 4)
    # GT: the first layer-0 anchor [-8, -8, 24, 24] shifted right by 4 px -> IoU 28/36 with it,
    # 20/44 (< 0.5) with its right neighbour: one positive
    gt = torch.tensor([[-4.0, -8.0, 28.0, 24.0]])
    assert int((ref_match(gt, anchors) >= 0).sum()) == 1
    targets = [{"boxes": gt, "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = loss_with_outputs(loss_model, regression, logits, targets)
    sig = lambda z: 1 / (1 + math.exp(-z))
    pos = lambda z: 0.75 * (1 - sig(z)) ** 2 * -math.log(sig(z))
    neg = lambda z: 0.25 * sig(z) ** 2 * -math.log(1 - sig(z))
    # 2 images x n anchors: background column all negative, 90 class columns with one positive
    expected_cls = (2 * n * neg(2.0) + (2 * 90 * n - 1) * neg(-1.0) + pos(-1.0)) / 1
    assert out["classification"].item() == pytest.approx(expected_cls, rel=1e-4)
    # box: tx = 10 * 4 / 32 = 1.25 -> Huber 0.75, others 0; / 1 positive / 4 (code size)
    assert out["bbox_regression"].item() == pytest.approx(0.75 / 4, rel=1e-5)


@pytest.mark.parametrize("background", [False, True])
def test_loss_against_reference(background):
    torch.manual_seed(1)
    model = fresh(background_class=background)
    anchors = spec_anchors(SIZES_320, 320, 320).float()
    n, width = anchors.shape[0], 91 if background else 3
    logits = torch.randn(2, n, width) * 2
    regression = torch.rand(2, n, 1).expand(2, n, 4) - 0.5  # same value per coordinate: order-free
    targets = [
        {"boxes": torch.tensor([[50.0, 40.0, 170.0, 200.0], [200.0, 210.0, 300.0, 290.0],
                                [10.0, 250.0, 40.0, 262.0]]),    # a small box: best IoU < 0.5
         "labels": torch.tensor([0, 2, 2])},
        {"boxes": torch.tensor([[0.0, 0.0, 320.0, 320.0]]), "labels": torch.tensor([1])},
    ]
    assert ref_iou(targets[0]["boxes"][2:], anchors).max() < 0.5  # forced match only
    cls_sum = box_sum = 0.0
    num_pos = 0
    for t, lg, rg in zip(targets, logits, regression):
        matched = ref_match(t["boxes"], anchors)
        pos = matched >= 0
        num_pos += int(pos.sum())
        target = torch.zeros(n, width)
        target[pos, t["labels"][matched[pos]] + int(background)] = 1.0  # background column stays 0
        cls_sum += focal(lg.double(), target.double()).sum().item()
        codes = ref_encode(t["boxes"][matched[pos]].double(), anchors[pos].double())
        box_sum += huber(rg[pos].double() - codes).sum().item()
    assert num_pos > 4
    out = loss_with_outputs(model, regression, logits, targets)
    assert out["classification"].item() == pytest.approx(cls_sum / num_pos, rel=1e-4)
    assert out["bbox_regression"].item() == pytest.approx(box_sum / num_pos / 4, rel=1e-4)


def test_loss_is_normalised_by_positives(loss_model):
    anchors = spec_anchors(SIZES_320, 320, 320).float()
    n = anchors.shape[0]
    logits, regression = torch.zeros(1, n, 91), torch.full((1, n, 4), 0.2)
    one = [{"boxes": torch.tensor([[100.0, 100.0, 200.0, 220.0]]), "labels": torch.tensor([0])}]
    two = [{"boxes": torch.tensor([[100.0, 100.0, 200.0, 220.0], [0.0, 0.0, 60.0, 50.0]]),
            "labels": torch.tensor([0, 2])}]
    p1 = int((ref_match(one[0]["boxes"], anchors) >= 0).sum())
    p2 = int((ref_match(two[0]["boxes"], anchors) >= 0).sum())
    assert p2 > p1 >= 1
    l1, l2 = (loss_with_outputs(loss_model, regression, logits, t) for t in (one, two))
    # with constant logits: sum = P*pos(0) + (91n - P)*neg(0), divided by P
    p0 = 0.75 * 0.25 * math.log(2)
    n0 = 0.25 * 0.25 * math.log(2)
    for lo, p in ((l1, p1), (l2, p2)):
        assert lo["classification"].item() == pytest.approx((p * p0 + (91 * n - p) * n0) / p, rel=1e-4)


def test_no_boxes_gives_zero_box_loss(loss_model):
    n = 2034
    logits = torch.zeros(2, n, 91)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    out = loss_with_outputs(loss_model, torch.zeros(2, n, 4), logits, [empty, dict(empty)])
    assert out["bbox_regression"].item() == 0
    # all 2 * n * 91 entries negative, normalised by max(1, 0) = 1
    assert out["classification"].item() == pytest.approx(2 * n * 91 * 0.25 * 0.25 * math.log(2), rel=1e-4)


# ----------------------------------------------------------------------------- postprocess


def detect(model, anchors, logits, regression=None, size=(320, 320)):
    """Eval forward of one image with the head outputs and anchors replaced."""
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    logits = torch.as_tensor(logits, dtype=torch.float32)
    if regression is None:
        regression = torch.zeros(anchors.shape[0], 4)
    model.head_outputs = lambda images: (regression[None], logits[None], SIZES_320)
    model.anchors = lambda sizes, image_size, device: anchors
    model.eval()
    out = model(torch.zeros(1, 3, *size))
    assert isinstance(out, list) and len(out) == 1
    return out[0]


LOW = -30.0  # sigmoid(-30) ~ 9e-14 < score threshold 1e-8


def shifted(d: float) -> list[list[float]]:
    """Two 100x100 boxes, the second shifted by d: IoU = (100 - d) / (100 + d)."""
    return [[100.0, 100.0, 200.0, 200.0], [100.0 + d, 100.0, 200.0 + d, 200.0]]


@pytest.fixture
def post_model():
    return fresh()


def test_scores_are_sigmoid(post_model):
    det = detect(post_model, [[10.0, 10.0, 60.0, 60.0]], [[0.3, -2.0, -1.0]])
    # the same box in 3 classes: no cross-class suppression, sorted by score
    assert det["labels"].tolist() == [0, 2, 1]
    expected = [1 / (1 + math.exp(-z)) for z in (0.3, -1.0, -2.0)]
    assert det["scores"].tolist() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 10.0, 60.0, 60.0]] * 3))


def test_nms_same_class_above_threshold(post_model):
    d = 100 * 0.35 / 1.65  # IoU 0.65 > 0.6
    det = detect(post_model, shifted(d), [[2.0, LOW, LOW], [1.0, LOW, LOW]])
    assert det["labels"].tolist() == [0]
    assert det["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-2.0))])
    torch.testing.assert_close(det["boxes"], torch.tensor(shifted(d)[:1]))


def test_nms_same_class_below_threshold(post_model):
    d = 100 * 0.45 / 1.55  # IoU 0.55 < 0.6
    assert ref_iou(torch.tensor(shifted(d))[:1], torch.tensor(shifted(d))[1:]).item() == pytest.approx(0.55)
    det = detect(post_model, shifted(d), [[2.0, LOW, LOW], [1.0, LOW, LOW]])
    assert det["labels"].tolist() == [0, 0]


def test_nms_iou_option():
    d = 100 * 0.45 / 1.55  # IoU 0.55: kept at TF's 0.6, suppressed at 0.45
    det = detect(small_detector(nms_iou=0.45), shifted(d), [[2.0, LOW, LOW], [1.0, LOW, LOW]])
    assert det["labels"].tolist() == [0]
    torch.testing.assert_close(det["boxes"], torch.tensor(shifted(d)[:1]))


def test_nms_is_per_class(post_model):
    det = detect(post_model, shifted(5.0), [[2.0, LOW, LOW], [LOW, 1.0, LOW]])  # IoU 0.9
    assert sorted(det["labels"].tolist()) == [0, 1]


def test_at_most_detections_per_img():
    grid = [[x * 10.0, y * 10.0, x * 10.0 + 8, y * 10.0 + 8] for y in range(30) for x in range(30)]
    logits = torch.full((900, 3), LOW)
    logits[:, 0] = torch.linspace(3, -3, 900)
    det = detect(fresh(), grid, logits)
    assert len(det["boxes"]) == 100  # max_total_detections 100 (non-overlapping boxes)
    assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    assert det["scores"][-1].item() == pytest.approx(torch.sigmoid(logits[99, 0]).item())
    torch.testing.assert_close(det["boxes"], torch.tensor(grid[:100]))


def test_boxes_are_clipped(post_model):
    det = detect(post_model, [[-20.0, -10.0, 400.0, 300.0]], [[1.0, LOW, LOW]])
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 320.0, 300.0]]))
    det = detect(post_model, [[-5.0, 600.0, 330.0, 700.0]], [[1.0, LOW, LOW]], size=(640, 320))
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 600.0, 320.0, 640.0]]))


def test_decoded_boxes_are_reported():
    model = fresh()
    anchors = torch.tensor([[100.0, 100.0, 132.0, 132.0]])
    reg = torch.tensor([[10 * 4 / 32, 10 * -2 / 32, 5 * math.log(2.0), 0.0]])  # dx 4, dy -2, w x2
    det = detect(model, anchors, [[1.0, LOW, LOW]], regression=reg)
    torch.testing.assert_close(det["boxes"], torch.tensor([[88.0, 98.0, 152.0, 130.0]]), rtol=0, atol=1e-4)


def test_background_column_is_dropped():
    model = fresh(background_class=True)
    det = detect(model, [[10.0, 10.0, 60.0, 60.0]], [[5.0, LOW, 1.0] + [LOW] * 88])
    assert det["labels"].tolist() == [1]  # column 2 -> class 1; the background never appears
    assert det["scores"].tolist() == pytest.approx([1 / (1 + math.exp(-1.0))])


def test_nms_is_not_starved_by_other_classes():
    # §3.6: per-class NMS over every anchor above the score threshold (1e-8), then the best 100.
    # 1,500 anchors on the same box: class 0 keeps 1 after NMS and class 1 keeps 1, so the spec's
    # output has both. A global pre-NMS cut to the top 1,000 scores would keep only class 0.
    box = [[40.0, 40.0, 140.0, 140.0]]
    logits = torch.full((1500, 3), LOW)
    logits[:, 0] = 3.0 + torch.linspace(0, 0.01, 1500)
    logits[:, 1] = 1.0
    det = detect(fresh(), box * 1500, logits)
    assert sorted(det["labels"].tolist()) == [0, 1]


# ------------------------------------------------------------------- train / eval contract


def _targets():
    return [{"boxes": torch.tensor([[30.0, 40.0, 150.0, 170.0], [200.0, 100.0, 260.0, 300.0]]),
             "labels": torch.tensor([0, 2])},
            {"boxes": torch.tensor([[0.0, 0.0, 320.0, 320.0]]), "labels": torch.tensor([1])}]


def test_train_mode_returns_losses_that_backprop():
    torch.manual_seed(0)
    model = fresh().train()
    losses = model(torch.rand(2, 3, 320, 320) * 2 - 1, _targets())
    assert set(losses) == {"classification", "bbox_regression"}
    for v in losses.values():
        assert v.dim() == 0 and torch.isfinite(v) and v.item() > 0
    sum(losses.values()).backward()
    stem = next(m for m in model.backbone.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    for head in model.cls_heads:  # every anchor has a classification target
        assert _last_conv(head).weight.grad.abs().sum() > 0
    assert any(_last_conv(h).weight.grad.abs().sum() > 0 for h in model.box_heads)


def test_train_mode_without_boxes():
    torch.manual_seed(0)
    model = fresh().train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model(torch.rand(2, 3, 128, 128), [empty, dict(empty)])
    assert losses["bbox_regression"].item() == 0
    assert torch.isfinite(losses["classification"]) and losses["classification"].item() > 0
    sum(losses.values()).backward()
    # mixed batch: one image with boxes, one without
    losses = model(torch.rand(2, 3, 128, 128), [_targets()[0], empty])
    assert all(torch.isfinite(v) for v in losses.values())


def test_eval_mode_returns_detections():
    torch.manual_seed(0)
    model = small_detector()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 320, 256) * 2 - 1)
    assert isinstance(out, list) and len(out) == 2
    for det in out:
        k = det["boxes"].shape[0]
        assert 0 < k <= 100
        assert det["boxes"].shape == (k, 4) and det["scores"].shape == (k,) and det["labels"].shape == (k,)
        assert det["labels"].dtype == torch.int64
        assert det["labels"].min() >= 0 and det["labels"].max() < 3
        assert torch.all((det["scores"] > 0) & (det["scores"] < 1))
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        b = det["boxes"]
        assert torch.all(b[:, 0] >= 0) and torch.all(b[:, 2] <= 256) and torch.all(b[:, 1] >= 0)
        assert torch.all(b[:, 3] <= 320) and torch.all(b[:, 2] >= b[:, 0]) and torch.all(b[:, 3] >= b[:, 1])


def spec_arch_json(variant: str) -> list[dict]:
    """The layer table written in the documented JSON format (mobilezoo.models.mobiledet)."""
    act = "hswish" if variant == "cpu" else "relu6"
    layers = []
    for row in TABLES[variant]:
        layer = {"type": row["type"], "kernel": row["k"], "stride": row["s"], "out": row["cout"],
                 "residual": row["residual"], "act": act,
                 "se": variant == "cpu" and row["type"] != "conv"}
        if row["type"] in ("ibn", "fused"):
            layer["expansion"] = row["e"]
        elif row["type"] == "tucker":
            layer["ratios"] = list(row["ratios"])
        layers.append(layer)
    return layers


def test_create_model_from_arch_json(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(spec_arch_json("cpu")))
    named = small_detector()  # create_model("ssdlite_mobiledet_cpu", num_classes=3)
    from_json = mobilezoo.create_model("ssdlite_mobiledet", arch=str(path), num_classes=3).eval()
    assert _num_values(from_json) == _num_values(named)
    from_json.load_state_dict(named.state_dict())  # strict: same names and shapes
    x = torch.rand(1, 3, 320, 320) * 2 - 1
    with torch.no_grad():
        for a, b in zip(named.head_outputs(x)[:2], from_json.head_outputs(x)[:2]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the {"layers": [...]} form and a pathlib.Path work too
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"layers": spec_arch_json("cpu")}))
    assert load_arch(wrapped) == load_arch(str(path)) == spec_arch_json("cpu")


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read"),
    (json.dumps({"name": "x"}), "non-empty list"),
    (json.dumps([]), "non-empty list"),
    (json.dumps([{"type": "conv", "kernel": 3, "stride": 2, "out": 16},
                 {"type": "mbconv", "kernel": 3, "stride": 2, "out": 16}]), "layer 1"),
    (json.dumps([{"type": "conv", "kernel": 3, "stride": 2}]), "layer 0"),
    (json.dumps([{"type": "conv", "kernel": 3, "stride": 2, "out": 16, "act": "gelu"}]), "layer 0"),
    (json.dumps([{"type": "ibn", "kernel": 3, "stride": 2, "out": 16}]), "stem"),
    (json.dumps([{"type": "conv", "kernel": 3, "stride": 2, "out": 16},
                 {"type": "ibn", "kernel": 3, "stride": 2, "out": 16}]), "stride"),
])
def test_invalid_arch_json(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        mobilezoo.create_model("ssdlite_mobiledet", arch=str(path), num_classes=3)


def test_missing_arch_file_and_no_arch(tmp_path):
    with pytest.raises(UserError, match="missing.json"):
        mobilezoo.create_model("ssdlite_mobiledet", arch=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="arch"):
        mobilezoo.create_model("ssdlite_mobiledet")


def test_timm_create_model():
    import timm
    model = timm.create_model("ssdlite_mobiledet_cpu", num_classes=3).eval()
    assert isinstance(model, SSDLite)
    with torch.no_grad():
        _, logits, _ = model.head_outputs(torch.zeros(1, 3, 320, 320))
        out = model(torch.zeros(1, 3, 320, 320))
    assert logits.shape == (1, 2034, 3)
    assert isinstance(out, list) and set(out[0]) == {"boxes", "scores", "labels"}
