"""Squeeze-excite over 2-D or 3-D feature maps."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_CONVS = {2: nn.Conv2d, 3: nn.Conv3d}


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 conv (bias) -> act -> 1x1 conv (bias) -> gate -> scale the input; `dims` 2 or 3."""

    def __init__(self, channels: int, reduced: int, act: Callable[[], nn.Module] = nn.SiLU,
                 gate: Callable[[], nn.Module] = nn.Sigmoid, dims: int = 2):
        super().__init__()
        if dims not in _CONVS:
            raise ValueError(f"SqueezeExcite works on 2-D or 3-D maps, got dims={dims}")
        self.dims = dims
        self.reduce = _CONVS[dims](channels, reduced, 1, bias=True)
        self.act = act()
        self.expand = _CONVS[dims](reduced, channels, 1, bias=True)
        self.gate = gate()

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The squeeze: each channel's mean over the map, as an (N, C, 1, ...) tensor."""
        if self.dims == 2 and not torch.jit.is_tracing():
            # 20x faster than mean() on channels-last bf16. The tracer would record the kernel size
            # as graph values, and ONNX pooling needs a constant one, hence the global pool there.
            return F.avg_pool2d(x, x.shape[-2:])
        return F.adaptive_avg_pool3d(x, 1) if self.dims == 3 else F.adaptive_avg_pool2d(x, 1)

    def excite(self, s: torch.Tensor) -> torch.Tensor:
        """Per-channel gate in (0, 1) from the pooled map `s`."""
        return self.gate(self.expand(self.act(self.reduce(s))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excite(self.pool(x))

    def sliced(self, x: torch.Tensor, reduced: int) -> torch.Tensor:
        """Run on x's leading channels with the first `reduced` squeeze channels (a supernet's choice)."""
        c = x.shape[1]
        s = self.act(F.conv2d(self.pool(x), self.reduce.weight[:reduced, :c], self.reduce.bias[:reduced]))
        return x * self.gate(F.conv2d(s, self.expand.weight[:c, :reduced], self.expand.bias[:c]))
