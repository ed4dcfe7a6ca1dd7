"""SqueezeTime blocks against the formulas of /work/shared/specs/squeezetime.md §1-§3, written out with F.*."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilezoo.layers.temporal import (
    CTL,
    IOI_HIDDEN,
    CTLBottleneck,
    IOIGate,
    TemporalImportance,
    resize_pos_embed,
    squeeze_time,
)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics, so no term of a formula can hide behind an identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return module.eval()


def bn(x, m: nn.BatchNorm2d):
    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)


def conv(x, m: nn.Conv2d, **kw):
    return F.conv2d(x, m.weight, m.bias, **kw)


# ---------------------------------------------------------------- squeeze (spec §1)

@pytest.mark.parametrize("frames", [16, 8, 5])
def test_squeeze_is_colour_major(frames):
    # Colour c of frame t holds the constant 100*c + t; channel c*T + t must hold exactly that.
    n, h, w = 2, 3, 4
    clip = torch.zeros(n, 3, frames, h, w)
    for c in range(3):
        for t in range(frames):
            clip[:, c, t] = 100 * c + t
    out = squeeze_time(clip)
    assert out.shape == (n, 3 * frames, h, w)
    for k in range(3 * frames):
        c, t = divmod(k, frames)
        assert torch.all(out[:, k] == 100 * c + t), (k, c, t)
    # spec: channels 0..T-1 are R of frames 0..T-1, then G, then B
    assert out[0, frames, 0, 0] == 100 and out[0, frames - 1, 0, 0] == frames - 1


def test_squeeze_is_a_view_of_contiguous_clips_and_accepts_channels_last_3d():
    clip = torch.randn(1, 3, 4, 5, 6)
    assert squeeze_time(clip).data_ptr() == clip.data_ptr()  # no copy
    cl = clip.contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(squeeze_time(cl), squeeze_time(clip), rtol=0, atol=0)


# ---------------------------------------------------------------- position maps (spec §2.3)

def test_pos_embed_untouched_at_its_own_size():
    pos = torch.randn(1, 16, 7, 7)
    assert resize_pos_embed(pos, (7, 7)) is pos


@pytest.mark.parametrize("size", [(4, 4), (10, 10), (5, 9), (56, 56)])
def test_pos_embed_resized_bilinear_align_corners(size):
    pos = torch.randn(1, 16, 14, 14)
    ref = F.interpolate(pos, size=size, mode="bilinear", align_corners=True)
    torch.testing.assert_close(resize_pos_embed(pos, size), ref, rtol=0, atol=0)


def test_pos_embed_resize_reproduces_a_linear_ramp():
    # Bilinear with align_corners=True maps corners to corners, so a ramp a*i + b*j over the p x p
    # table becomes the same ramp sampled at i*(p-1)/(s-1) — exactly, independent of the implementation.
    p, s = 7, 13
    i, j = torch.meshgrid(torch.arange(p, dtype=torch.float64), torch.arange(p, dtype=torch.float64), indexing="ij")
    pos = (3 * i - 2 * j).expand(1, 2, p, p)
    u, v = torch.meshgrid(torch.arange(s, dtype=torch.float64) * (p - 1) / (s - 1),
                          torch.arange(s, dtype=torch.float64) * (p - 1) / (s - 1), indexing="ij")
    torch.testing.assert_close(resize_pos_embed(pos, (s, s))[0, 1], 3 * u - 2 * v)


# ---------------------------------------------------------------- CTL pieces (spec §2)

def test_temporal_importance_is_se_without_reduction():
    m = randomize(TemporalImportance(24))
    convs = [x for x in m if isinstance(x, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(24, 24, 1, 1)] * 2
    assert all(c.bias is None for c in convs)
    x = torch.randn(2, 24, 5, 6)
    beta = m(x)
    ref = torch.sigmoid(conv(F.relu(bn(conv(x.mean((2, 3), keepdim=True), convs[0]), m[2])), convs[1]))
    assert beta.shape == (2, 24, 1, 1)
    torch.testing.assert_close(beta, ref)


def ioi_reference(m: IOIGate, x, xw):
    """spec §2.3: S * sigmoid(3x3(ReLU(BN(7x7(ReLU(BN(3x3(beta x))) + P))))), P resized to the map."""
    gc = m.glo_conv
    g0 = F.relu(bn(conv(xw, gc[0], padding=1), gc[1]))
    g0 = g0 + F.interpolate(m.pos_embed, size=x.shape[-2:], mode="bilinear", align_corners=True)
    g = torch.sigmoid(conv(F.relu(bn(conv(g0, gc[3], padding=3), gc[4])), gc[6], padding=1))
    return conv(x, m.short_conv, padding=1) * g


@pytest.mark.parametrize("hw", [(7, 7), (9, 11)])
def test_ioi_gate_matches_spec(hw):
    m = randomize(IOIGate(12, 12, pos_dim=7))
    assert tuple(m.pos_embed.shape) == (1, IOI_HIDDEN, 7, 7)
    assert m.short_conv.bias is not None and m.glo_conv[3].kernel_size == (7, 7)
    x, xw = torch.randn(2, 12, *hw), torch.randn(2, 12, *hw)
    torch.testing.assert_close(m(x, xw), ioi_reference(m, x, xw))


@pytest.mark.parametrize("hw", [(7, 7), (4, 5)])
def test_ctl_matches_spec(hw):
    m = randomize(CTL(12, pos_dim=7))
    x = torch.randn(2, 12, *hw)
    pc = m.param_conv
    beta = torch.sigmoid(conv(F.relu(bn(conv(x.mean((2, 3), keepdim=True), pc[1]), pc[2])), pc[4]))
    tfc = conv(beta * x, m.temporal_conv)  # temporal focus conv: 1x1, no bias
    assert m.temporal_conv.kernel_size == (1, 1) and m.temporal_conv.bias is None
    torch.testing.assert_close(m(x), tfc + ioi_reference(m.spatial_conv, x, beta * x))


def bottleneck_reference(b: CTLBottleneck, x):
    """spec §3: depthwise 2x2/2 + BN on the block input (if strided), then the bottleneck + shortcut."""
    if b.downsample is not None:
        dw = b.downsample[0]
        x = bn(F.conv2d(x, dw.weight, dw.bias, stride=2, groups=x.shape[1]), b.downsample[1])
    out = F.relu(bn(conv(x, b.conv1), b.bn1))
    out = F.relu(bn(b.conv2(out), b.bn2))
    out = bn(conv(out, b.conv3), b.bn3)
    short = x if b.shortcut_conv is None else bn(conv(x, b.shortcut_conv[0]), b.shortcut_conv[1])
    return F.relu(out + short)


@pytest.mark.parametrize("in_ch, planes, stride, hw, out_hw", [
    (16, 4, 1, (8, 8), (8, 8)),    # first block of stage 1: projection, no downsampling
    (16, 4, 1, (7, 5), (7, 5)),    # identity shortcut (in_ch == 4 * planes)
    (16, 8, 2, (8, 8), (4, 4)),    # first block of a later stage
    (16, 8, 2, (7, 9), (3, 4)),    # odd sides: 2x2/2 without padding floors
])
def test_bottleneck_matches_spec(in_ch, planes, stride, hw, out_hw):
    b = randomize(CTLBottleneck(in_ch, planes, stride, pos_dim=4))
    assert (b.downsample is not None) == (stride == 2)
    assert (b.shortcut_conv is not None) == (in_ch != 4 * planes)
    if stride == 2:
        dw = b.downsample[0]
        assert tuple(dw.weight.shape) == (in_ch, 1, 2, 2) and dw.stride == (2, 2) and dw.bias is not None
    if b.shortcut_conv is not None:
        assert b.shortcut_conv[0].stride == (1, 1) and b.shortcut_conv[0].bias is None
    x = torch.randn(2, in_ch, *hw)
    y = b(x)
    assert y.shape == (2, 4 * planes, *out_hw)
    torch.testing.assert_close(y, bottleneck_reference(b, x))


def test_bottleneck_parameter_count_by_hand():
    # layer1.0 of the released model (spec §3): C_in 64, planes 64, pos_dim 56; every term written out.
    p, c_in, k = 64, 64, IOI_HIDDEN
    ctl = (2 * p * p + 2 * p  # beta: two 1x1 + BN
           + p * p  # TFC
           + k * 56 * 56  # position maps
           + 9 * p * p + p  # IOI short 3x3 with bias
           + 9 * p * k + k + 2 * k + 49 * k * k + k + 2 * k + 9 * k * p + p)  # IOI gate
    block = c_in * p + 2 * p + ctl + 2 * p + p * 4 * p + 8 * p + c_in * 4 * p + 8 * p
    m = CTLBottleneck(c_in, p, 1, pos_dim=56)
    assert sum(t.numel() for t in m.parameters()) == block


def test_bottleneck_trains_with_autograd():
    b = CTLBottleneck(8, 2, 2, pos_dim=3).train()
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    b(x).square().mean().backward()
    assert x.grad is not None and b.conv2.spatial_conv.pos_embed.grad.abs().sum() > 0
    assert all(p.grad is not None for p in b.parameters())
