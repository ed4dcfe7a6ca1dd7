"""TF 'SAME' padding, Conv2dSame and AvgPool2dSame (spec §1.1, §8 'Padding')."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mobilezoo.layers import AvgPool2dSame, Conv2dSame, tf_same_pad


@pytest.mark.parametrize("size, kernel, stride, expected", [
    (8, 3, 2, (0, 1)),    # stride-2 3x3 on even input: 0 before, 1 after
    (224, 3, 2, (0, 1)),
    (7, 3, 2, (1, 1)),    # odd input: symmetric
    (15, 3, 2, (1, 1)),
    (8, 3, 1, (1, 1)),    # stride 1: symmetric whatever the size
    (7, 3, 1, (1, 1)),
    (9, 5, 1, (2, 2)),
    (8, 1, 1, (0, 0)),
    (8, 2, 2, (0, 0)),    # pool 2 / stride 2 on even input: no padding
    (7, 2, 2, (0, 1)),
])
def test_tf_same_pad_known_values(size, kernel, stride, expected):
    assert tf_same_pad(size, kernel, stride) == expected


@settings(deadline=None, max_examples=200)
@given(size=st.integers(1, 300), kernel=st.integers(1, 7), stride=st.integers(1, 4),
       dilation=st.integers(1, 3))
def test_tf_same_pad_property(size, kernel, stride, dilation):
    before, after = tf_same_pad(size, kernel, stride, dilation)
    total, eff = before + after, (kernel - 1) * dilation + 1
    assert before >= 0 and after - before in (0, 1)  # TF puts the odd cell at the end
    out = (size + total - eff) // stride + 1
    assert out == math.ceil(size / stride)
    # minimal: one cell less of padding would lose an output (or there is no padding at all)
    assert total == 0 or (size + total - 1 - eff) // stride + 1 < out


@pytest.mark.parametrize("hw, stride, pad_h, pad_w", [
    ((8, 8), 2, (0, 1), (0, 1)), ((7, 7), 2, (1, 1), (1, 1)), ((8, 7), 2, (0, 1), (1, 1)),
    ((8, 7), 1, (1, 1), (1, 1)),
])
def test_conv2d_same_equals_manual_pad(hw, stride, pad_h, pad_w):
    torch.manual_seed(0)
    conv = Conv2dSame(3, 5, 3, stride, bias=True)
    x = torch.randn(2, 3, *hw)
    ref = F.conv2d(F.pad(x, (*pad_w, *pad_h)), conv.weight, conv.bias, stride)
    out = conv(x)
    assert out.shape[-2:] == tuple(math.ceil(n / stride) for n in hw)
    torch.testing.assert_close(out, ref)


def test_depthwise_conv2d_same():
    torch.manual_seed(0)
    conv = Conv2dSame(4, 4, 3, 2, groups=4, bias=False)
    x = torch.randn(1, 4, 6, 6)
    ref = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, None, 2, groups=4)
    torch.testing.assert_close(conv(x), ref)


def test_avgpool_same_excludes_padding_even():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = AvgPool2dSame(3, 2)(x)  # pads 0 before, 1 after on each axis
    assert y.shape == (1, 1, 2, 2)
    assert y[0, 0, 0, 0] == x[0, 0, 0:3, 0:3].mean()  # no padding touched
    # bottom-right window covers rows/cols 2..4 of which 4 is padding: mean of the 4 real cells
    assert y[0, 0, 1, 1] == pytest.approx((10 + 11 + 14 + 15) / 4)
    assert y[0, 0, 0, 1] == pytest.approx(x[0, 0, 0:3, 2:4].mean().item())


def test_avgpool_same_excludes_padding_odd():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    y = AvgPool2dSame(3, 2)(x)  # pads 1 / 1
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0, 0, 0] == pytest.approx((0 + 1 + 5 + 6) / 4)  # top-left corner: 4 real cells
    assert y[0, 0, 1, 1] == pytest.approx(x[0, 0, 1:4, 1:4].mean().item())
    assert y[0, 0, 2, 2] == pytest.approx((18 + 19 + 23 + 24) / 4)


def test_avgpool_same_pool2_even_is_plain():
    x = torch.randn(2, 3, 8, 6)
    torch.testing.assert_close(AvgPool2dSame(2, 2)(x), F.avg_pool2d(x, 2, 2))


@pytest.mark.parametrize("kernel", [2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_avgpool_same_equals_mean_over_real_cells_for_every_size(kernel, stride):
    """The no-copy ceil-mode path and the padded fallback both equal sum-of-real-cells / their count."""
    for h in range(3, 16):
        x = torch.randn(2, 3, h, h + 1)
        ph, pw = tf_same_pad(h, kernel, stride), tf_same_pad(h + 1, kernel, stride)
        pad = (pw[0], pw[1], ph[0], ph[1])
        summed = F.avg_pool2d(F.pad(x, pad), kernel, stride, divisor_override=1)
        count = F.avg_pool2d(F.pad(torch.ones(1, 1, h, h + 1), pad), kernel, stride, divisor_override=1)
        torch.testing.assert_close(AvgPool2dSame(kernel, stride)(x), summed / count)
