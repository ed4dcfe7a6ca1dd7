"""Convolutions with TensorFlow 'same' padding, and conv -> norm -> activation."""
from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
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


def same_padding(x: torch.Tensor, weight: torch.Tensor, stride: int, dilation: int = 1,
                 pad_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(input, weight, padding) that make `F.conv2d(input, weight, ..., padding)` pad as TF 'SAME'.

    The one place TF 'SAME' convolution padding is decided: Conv2dSame, the fused inference conv
    and the supernet's sliced convs all call it."""
    kh, kw = weight.shape[-2:]
    if _is_symmetric(kh, stride, dilation) and _is_symmetric(kw, stride, dilation):
        return x, weight, [(kh - 1) * dilation // 2, (kw - 1) * dilation // 2]
    ph, pw = tf_same_pad(x.shape[-2], kh, stride, dilation), tf_same_pad(x.shape[-1], kw, stride, dilation)
    if pad_weights and dilation == 1 and all(after - before in (0, 1) for before, after in (ph, pw)):
        # Pads (p, p + 1): prepend a zero row/column to the kernel and pad p + 1 on both sides.
        # Bit-identical to padding the input, without copying the input (4x faster on CPU).
        return x, F.pad(weight, (pw[1] - pw[0], 0, ph[1] - ph[0], 0)), [ph[1], pw[1]]
    return F.pad(x, (pw[0], pw[1], ph[0], ph[1])), weight, [0, 0]


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding (asymmetric for strided convs, computed per input)."""

    pad_weights = True  # the fast path of `same_padding`; `reference_padding()` turns it off (MAC counting)

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        sym = _is_symmetric(kernel_size, stride, dilation)
        super().__init__(in_ch, out_ch, kernel_size, stride,
                         padding=(kernel_size - 1) * dilation // 2 if sym else 0,
                         dilation=dilation, groups=groups, bias=bias)
        self.dynamic = not sym

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """nn.Conv2d's forward calls this with its weight; callers with another weight (QAT) too."""
        if not self.dynamic:
            return super()._conv_forward(x, weight, bias)
        x, w, padding = same_padding(x, weight, self.stride[0], self.dilation[0], self.pad_weights)
        return F.conv2d(x, w, bias, self.stride, padding, self.dilation, self.groups)


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


@lru_cache(maxsize=64)
def _valid_cell_scale(h: int, w: int, k: int, s: int, ph: tuple[int, int], pw: tuple[int, int]) -> torch.Tensor:
    """k^2 / (cells of each pooling window inside the unpadded h x w map), shape (1, 1, out_h, out_w)."""
    def valid(n: int, before: int, out: int) -> list[int]:
        return [min(i * s - before + k, n) - max(i * s - before, 0) for i in range(out)]
    rows = valid(h, ph[0], (h + sum(ph) - k) // s + 1)
    cols = valid(w, pw[0], (w + sum(pw) - k) // s + 1)
    return (k * k / torch.outer(torch.tensor(rows, dtype=torch.float64), torch.tensor(cols, dtype=torch.float64))
            ).float()[None, None]


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
        # The mean over k x k (zeros included) rescaled by k^2 / valid cells: in an exported graph one
        # AveragePool and a constant Mul (ONNX's AveragePool has no divisor_override, and pooling a
        # ones map at run time keeps OpenVINO's bf16 compiler from building the graph). The map's
        # sides become constants of the trace: the models using this pool export at fixed sizes.
        scale = _valid_cell_scale(int(x.shape[-2]), int(x.shape[-1]), k, s, ph, pw).to(x.device, x.dtype)
        return F.avg_pool2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), k, s) * scale

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


def center_slice(t: torch.Tensor, shape) -> torch.Tensor:
    """The part of a shared tensor that a smaller one inherits: leading entries, centred kernel taps
    (weight sharing as in TuNAS and once-for-all)."""
    if t.dim() == 0:
        return t
    index = []
    for d, (have, want) in enumerate(zip(t.shape, shape)):
        if want > have:
            raise ValueError(f"cannot take {tuple(shape)} from a shared tensor of shape {tuple(t.shape)}")
        off = (have - want) // 2 if (t.dim() == 4 and d >= 2) else 0
        index.append(slice(off, off + want))
    return t[tuple(index)]


def sliced_conv(conv: nn.Conv2d, x: torch.Tensor, out: int | None = None, kernel: int | None = None) -> torch.Tensor:
    """`conv` on x's (leading) input channels with its first `out` filters and centre `kernel` taps.

    A grouped conv is taken as depthwise: it keeps one filter per input channel."""
    cin = x.shape[1]
    depthwise = conv.groups > 1
    out = cin if depthwise else conv.out_channels if out is None else out
    k = conv.kernel_size[0] if kernel is None else kernel
    w = center_slice(conv.weight, (out, 1 if depthwise else cin, k, k))
    b = None if conv.bias is None else conv.bias[:out]
    if isinstance(conv, Conv2dSame):
        x, w, padding = same_padding(x, w, conv.stride[0], conv.dilation[0], conv.pad_weights)
    else:  # symmetric padding, as make_conv's, for the centred kernel
        padding = conv.padding if k == conv.kernel_size[0] else [(k - 1) // 2] * 2
    return F.conv2d(x, w, b, conv.stride, padding, conv.dilation, cin if depthwise else 1)


def sliced_batch_norm(bn: nn.BatchNorm2d, y: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
    """`bn` on y's channels with the first entries of its affine parameters and running statistics.

    In training it normalises with batch statistics and, with `update_stats`, moves the running
    statistics of that slice only; otherwise they stay untouched."""
    c = y.shape[1]
    training = bn.training
    stats = (bn.running_mean[:c], bn.running_var[:c]) if update_stats or not training else (None, None)
    return F.batch_norm(y, *stats, bn.weight[:c], bn.bias[:c], training, bn.momentum if training else 0.0, bn.eps)


def run_sliced(module: nn.Module, x: torch.Tensor, update_stats: bool = True) -> torch.Tensor:
    """`module` on x, sliced to x's width: a module with `sliced`, a conv, or a Sequential of those."""
    if isinstance(module, nn.Sequential) and not hasattr(module, "sliced"):
        for m in module:
            x = run_sliced(m, x, update_stats)
        return x
    if hasattr(module, "sliced"):
        return module.sliced(x, update_stats=update_stats)
    if isinstance(module, nn.Conv2d):
        return sliced_conv(module, x)
    if isinstance(module, nn.BatchNorm2d):
        return sliced_batch_norm(module, x, update_stats)
    return module(x)


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

    def sliced(self, x: torch.Tensor, out: int | None = None, kernel: int | None = None,
               update_stats: bool = True) -> torch.Tensor:
        """This layer on x's width with `out` outputs and a centred `kernel` (a supernet's sub-network)."""
        y = sliced_conv(self[0], x, out, kernel)
        for m in list(self)[1:]:
            y = sliced_batch_norm(m, y, update_stats) if isinstance(m, nn.BatchNorm2d) else m(y)
        return y
