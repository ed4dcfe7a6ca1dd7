"""MobileDet blocks (spec mobiledets.md §1.2-1.3): `scale_filters` and `MobileBlock` per type.

Every expected number is taken from the spec or computed here from the spec's formulas; the block
structure is read from an execution trace (forward hooks on the leaf modules), not from attributes.
"""
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mobilezoo.layers.ibn import MobileBlock, scale_filters

ACTS = (nn.ReLU6, nn.Hardswish, nn.ReLU, nn.SiLU, nn.GELU, nn.Hardsigmoid, nn.Sigmoid)


# ----------------------------------------------------------------------------- scale_filters


def ref_scale(c: int, m: Fraction) -> int:
    """Spec §1.2: c' = max(8, 8 * floor(c*m/8 + 1/2)), in exact arithmetic."""
    x = Fraction(c) * m / 8 + Fraction(1, 2)
    return max(8, 8 * (x.numerator // x.denominator))


@pytest.mark.parametrize("c, m, expected", [
    # SE hidden widths of MobileDet-CPU (spec §2.2): round8(hidden / 4)
    (16, 0.25, 8), (32, 0.25, 8), (128, 0.25, 32), (288, 0.25, 72), (576, 0.25, 144),
    (416, 0.25, 104), (832, 0.25, 208),
    # Tucker ranks (spec §2.3-2.5): DSP 32->(8, 24), 160->(120, 120); EdgeTPU 32->16 (8, 16);
    # GPU 32->16 (8, 8)
    (32, 0.25, 8), (32, 0.75, 24), (160, 0.75, 120), (16, 0.75, 16), (16, 0.25, 8),
    # round half *up* (Python's round() would give 16, 32, 48)
    (20, 1.0, 24), (36, 1.0, 40), (52, 1.0, 56),
    # no MobileNet 10% rule: make_divisible(11) = 16, make_divisible(19) = 24
    (11, 1.0, 8), (19, 1.0, 16), (27, 1.0, 24),
    # floor of 8
    (1, 1.0, 8), (3, 1.0, 8), (0, 1.0, 8), (4, 1.0, 8), (12, 1.0, 16),
    # the released widths are fixed points at multiplier 1
    (72, 1.0, 72), (104, 1.0, 104), (144, 1.0, 144), (240, 1.0, 240), (384, 1.0, 384),
    # multipliers
    (72, 0.5, 40), (104, 0.5, 56), (144, 0.75, 112), (16, 0.5, 8), (120, 1.5, 184),
])
def test_scale_filters_known_values(c, m, expected):
    assert scale_filters(c, m) == expected
    assert ref_scale(c, Fraction(m)) == expected


@settings(deadline=None, max_examples=300)
@given(c=st.integers(0, 4096), k=st.integers(1, 64))
def test_scale_filters_property(c, k):
    m = Fraction(k, 16)  # dyadic multipliers are exact in floating point
    got = scale_filters(c, float(m))
    assert isinstance(got, int)
    assert got == ref_scale(c, m)
    # characterisation: a multiple of 8, at least 8, the nearest multiple of 8 (ties up)
    assert got % 8 == 0 and got >= 8
    target = Fraction(c) * m
    if target >= 4:
        assert -4 < got - target <= 4
    else:
        assert got == 8


def test_scale_filters_other_base():
    # base 16: 20/16 + 0.5 = 1.75 -> 16; 24/16 + 0.5 = 2.0 -> 32; floor of 16
    assert scale_filters(20, 1.0, base=16) == 16
    assert scale_filters(24, 1.0, base=16) == 32
    assert scale_filters(3, 1.0, base=16) == 16


# ----------------------------------------------------------------------------- MobileBlock


def trace(block: nn.Module, x: torch.Tensor) -> list:
    """(module, input shape, output shape) of every leaf module, in execution order."""
    events = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: events.append(
        (mod, tuple(inp[0].shape), tuple(out.shape))))
        for m in block.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for h in hooks:
            h.remove()
    return events


def signature(events) -> list[str]:
    """Compact strings: conv{k}x{k}/s{s}:{in}->{out} ('dw' for depthwise, '+b' if biased,
    '@gap' when applied to a globally pooled 1x1 map), 'bn', or the activation's class name."""
    out = []
    for m, inp, _ in events:
        if isinstance(m, nn.Conv2d):
            k, s = m.kernel_size[0], m.stride[0]
            assert m.kernel_size == (k, k) and m.stride == (s, s) and m.dilation == (1, 1)
            if m.groups > 1:
                assert m.groups == m.in_channels == m.out_channels, "only depthwise grouping"
                kind = "dw"
            else:
                kind = "conv"
            tag = f"{kind}{k}x{k}/s{s}:{m.in_channels}->{m.out_channels}"
            tag += "+b" if m.bias is not None else ""
            tag += "@gap" if inp[-2:] == (1, 1) else ""
            out.append(tag)
        elif isinstance(m, nn.BatchNorm2d):
            out.append("bn")
        elif isinstance(m, ACTS):
            out.append(type(m).__name__)
        elif isinstance(m, nn.Identity):
            continue
        else:  # a module type these tests do not know about: show it
            out.append(type(m).__name__)
    return out


def se_sig(ch: int, act: str) -> list[str]:
    r = ref_scale(ch, Fraction(1, 4))  # spec: hidden = _scale_filters(C, 0.25)
    return [f"conv1x1/s1:{ch}->{r}+b@gap", act, f"conv1x1/s1:{r}->{ch}+b@gap", "Sigmoid"]


def expected_signature(kind, cin, cout, k, s, e, ratios, se, act) -> list[str]:
    """Spec §1.3 block table, written out."""
    if kind == "ibn_noexp":
        h = cin
        body = [f"dw{k}x{k}/s{s}:{cin}->{cin}", "bn", act]
    elif kind == "ibn":
        h = cin * e  # relative to the *input* width
        body = [f"conv1x1/s1:{cin}->{h}", "bn", act, f"dw{k}x{k}/s{s}:{h}->{h}", "bn", act]
    elif kind == "fused":
        h = cin * e
        body = [f"conv{k}x{k}/s{s}:{cin}->{h}", "bn", act]
    else:  # tucker: ranks from C_in and C_out
        r_in, h = ref_scale(cin, Fraction(ratios[0])), ref_scale(cout, Fraction(ratios[1]))
        body = [f"conv1x1/s1:{cin}->{r_in}", "bn", act, f"conv{k}x{k}/s{s}:{r_in}->{h}", "bn", act]
        se = False
    if se:
        body += se_sig(h, act)
    return body + [f"conv1x1/s1:{h}->{cout}", "bn"]  # linear projection: BN, no activation


ACT_FN = {"ReLU6": nn.ReLU6, "Hardswish": nn.Hardswish}

BLOCK_CASES = [
    # kind, in, out, k, s, e, ratios, se
    ("ibn_noexp", 16, 8, 3, 1, 1, None, True),      # CPU layer 1
    ("ibn_noexp", 32, 24, 3, 1, 1, None, False),    # DSP layer 1
    ("ibn", 8, 16, 3, 2, 4, None, True),            # CPU layer 2: hidden 32, SE 8
    ("ibn", 32, 72, 5, 2, 8, None, True),           # CPU layer 7: hidden 256 (not 576)
    ("ibn", 72, 72, 3, 1, 8, None, False),
    ("ibn", 104, 144, 3, 1, 8, None, True),         # CPU layer 19: hidden 832, SE 208
    ("fused", 24, 32, 3, 2, 4, None, False),        # DSP layer 2: hidden 96
    ("fused", 16, 40, 5, 2, 8, None, False),        # EdgeTPU layer 6: hidden 128
    ("fused", 16, 16, 3, 1, 4, None, True),
    ("tucker", 32, 16, 3, 1, None, (0.25, 0.75), False),   # EdgeTPU layer 1: 8 -> 16
    ("tucker", 32, 16, 3, 1, None, (0.25, 0.25), False),   # GPU layer 1: 8 -> 8
    ("tucker", 32, 32, 3, 1, None, (0.25, 0.75), False),   # DSP layer 5: 8 -> 24
    ("tucker", 160, 160, 3, 1, None, (0.75, 0.75), False),  # DSP layer 21: 120 -> 120
    ("tucker", 32, 64, 3, 2, None, (0.25, 0.25), False),
]


def make_block(kind, cin, cout, k, s, e, ratios, se, act="ReLU6", residual=False):
    kwargs = dict(kernel=k, stride=s, residual=residual, se=se, act=ACT_FN[act])
    if e is not None:
        kwargs["expansion"] = e
    if ratios is not None:
        kwargs["ratios"] = ratios
    return MobileBlock(kind, cin, cout, **kwargs)


@pytest.mark.parametrize("act", ["ReLU6", "Hardswish"])
@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-k{c[3]}s{c[4]}")
def test_block_structure(case, act):
    kind, cin, cout, k, s, e, ratios, se = case
    block = make_block(*case, act=act).eval()
    x = torch.randn(2, cin, 10, 9)
    events = trace(block, x)
    assert signature(events) == expected_signature(*case, act=act)
    # 'same' padding: output ceil(H/s) x ceil(W/s), C_out channels
    assert events and block(x).shape == (2, cout, -(-10 // s), -(-9 // s))
    # no parameters other than the traced modules' (e.g. no hidden bias anywhere)
    traced = {id(p) for m, _, _ in events for p in m.parameters()}
    assert all(id(p) in traced for p in block.parameters())


def test_expansion_is_relative_to_input_channels():
    # spec §1.2: CPU layer 7 is 32->72 with e=8 and hidden 256 (input-relative), not 576
    for kind in ("ibn", "fused"):
        sig = signature(trace(MobileBlock(kind, 32, 72, 5, 2, expansion=8), torch.randn(1, 32, 8, 8)))
        assert sig[0].endswith(":32->256"), sig
        assert sig[-2] == "conv1x1/s1:256->72"


def test_se_only_where_asked():
    for kind in ("ibn_noexp", "ibn", "fused"):
        for se in (False, True):
            sig = signature(trace(MobileBlock(kind, 16, 16, se=se, act=nn.Hardswish),
                                  torch.randn(1, 16, 6, 6)))
            assert ("Sigmoid" in sig) == se
            assert any(t.endswith("@gap") for t in sig) == se


def test_tucker_never_has_se():
    try:
        block = MobileBlock("tucker", 32, 32, se=True)
    except ValueError:
        return  # rejecting it is fine too
    assert "Sigmoid" not in signature(trace(block, torch.randn(1, 32, 6, 6)))


def test_se_activation_is_the_block_activation():
    # spec §1.1: hard-swish in the SE hidden layer for CPU; the gate is sigmoid, not hard-sigmoid
    sig = signature(trace(MobileBlock("ibn", 16, 16, se=True, expansion=4, act=nn.Hardswish),
                          torch.randn(1, 16, 6, 6)))
    i = sig.index("conv1x1/s1:64->16+b@gap")
    assert sig[i + 1] == "Hardswish" and sig[i + 3] == "Sigmoid"
    assert "ReLU6" not in sig and "Hardsigmoid" not in sig


def test_se_gates_the_features():
    # with the SE convs zeroed and the gate bias at b, the SE multiplies by sigmoid(b) exactly
    torch.manual_seed(0)
    block = MobileBlock("fused", 8, 8, expansion=4, se=True).eval()
    plain = MobileBlock("fused", 8, 8, expansion=4, se=False).eval()
    events = trace(block, torch.randn(1, 8, 6, 6))
    se_convs = [m for m, i, _ in events if isinstance(m, nn.Conv2d) and i[-2:] == (1, 1)]
    assert len(se_convs) == 2
    for m in se_convs:
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
    nn.init.constant_(se_convs[1].bias, 0.7)
    # copy the other weights into the SE-free block (same order of non-SE modules)
    src = [m for m, _, _ in events if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m not in se_convs]
    dst = [m for m, _, _ in trace(plain, torch.randn(1, 8, 6, 6))
           if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert len(src) == len(dst) == 4
    for a, b in zip(src, dst):
        b.load_state_dict(a.state_dict())
    # sigmoid(0.7) * h before the (linear) projection conv == scaling that conv's weight
    with torch.no_grad():
        dst[-2].weight.mul_(torch.sigmoid(torch.tensor(0.7)))
        x = torch.randn(2, 8, 6, 6)
        torch.testing.assert_close(block(x), plain(x), rtol=1e-5, atol=1e-5)


def last_bn(block, cin):
    bns = [m for m, _, _ in trace(block, torch.randn(1, cin, 6, 6)) if isinstance(m, nn.BatchNorm2d)]
    return bns[-1]


@pytest.mark.parametrize("kind", ["ibn", "fused", "tucker"])
def test_residual_only_when_asked(kind):
    torch.manual_seed(0)
    with_res = MobileBlock(kind, 16, 16, residual=True).eval()
    without = MobileBlock(kind, 16, 16, residual=False).eval()
    without.load_state_dict(with_res.state_dict())
    x = torch.randn(2, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(with_res(x) - without(x), x, rtol=1e-5, atol=1e-5)
        # a zero projection (BN gamma = beta = 0) leaves exactly the shortcut, or nothing
        for block in (with_res, without):
            bn = last_bn(block, 16)
            nn.init.zeros_(bn.weight)
            nn.init.zeros_(bn.bias)
        torch.testing.assert_close(with_res(x), x)
        assert torch.count_nonzero(without(x)) == 0


def test_same_shape_layer_without_residual_is_not_a_skip():
    # the pitfall of spec §1.3: CPU layer 11 (72->72, e8) is same-shape but non-residual
    block = MobileBlock("ibn", 72, 72, 3, 1, expansion=8, residual=False, se=True,
                        act=nn.Hardswish).eval()
    bn = last_bn(block, 72)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    with torch.no_grad():
        assert torch.count_nonzero(block(torch.randn(1, 72, 5, 5))) == 0


def test_default_is_no_residual():
    block = MobileBlock("ibn", 16, 16).eval()
    bn = last_bn(block, 16)
    nn.init.zeros_(bn.weight)
    nn.init.zeros_(bn.bias)
    with torch.no_grad():
        assert torch.count_nonzero(block(torch.randn(1, 16, 5, 5))) == 0


@pytest.mark.parametrize("kind", ["ibn", "fused", "tucker"])
def test_residual_with_stride_2_or_new_width_raises(kind):
    with pytest.raises(ValueError, match="residual"):
        MobileBlock(kind, 16, 16, stride=2, residual=True)
    with pytest.raises(ValueError, match="residual"):
        MobileBlock(kind, 16, 24, stride=1, residual=True)


@pytest.mark.parametrize("kind", ["ibn_noexp", "ibn", "fused", "tucker"])
def test_projection_is_linear(kind):
    # train-mode BN output has mean 0 / var 1 per channel: a ReLU6 or hard-swish after the
    # projection would make min >= 0 or >= -0.375
    torch.manual_seed(0)
    block = MobileBlock(kind, 16, 16, act=nn.Hardswish).train()
    y = block(torch.randn(4, 16, 8, 8))
    assert y.min() < -1.0


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="unknown block type"):
        MobileBlock("mbconv", 16, 16)


def test_block_backprops():
    block = MobileBlock("ibn", 16, 16, expansion=4, se=True, residual=True, act=nn.Hardswish)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    block(x).square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("kind, big, small", [
    ("ibn", dict(kernel=5, expansion=8), dict(kernel=3, expansion=4)),
    ("fused", dict(kernel=5, expansion=8), dict(kernel=3, expansion=4)),
    ("tucker", dict(kernel=3, ratios=(0.75, 0.75)), dict(kernel=3, ratios=(0.25, 0.25))),
    ("ibn_noexp", dict(kernel=5), dict(kernel=3)),
])
def test_sliced_block_equals_the_small_block_with_the_shared_weights(kind, big, small):
    # A block built wide runs a narrower one on its leading filters and centre taps (supernet sharing).
    from mobilezoo.layers.conv import center_slice
    torch.manual_seed(0)
    wide = MobileBlock(kind, 16, 24, stride=2, se=kind != "tucker", act=nn.Hardswish, **big).eval()
    for m in wide.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    narrow = MobileBlock(kind, 8, 16, stride=2, se=kind != "tucker", act=nn.Hardswish, **small).eval()
    wide_state = wide.state_dict()
    narrow.load_state_dict({k: center_slice(wide_state[k], v.shape) for k, v in narrow.state_dict().items()})
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        torch.testing.assert_close(wide.sliced(x, 16, **small), narrow(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(wide.sliced(x, 16, **small), wide.sliced(x, 16, **big))  # the choice matters
