"""Shape-preserving 3D inverted bottleneck (MobileNetV2/EfficientNet MBConv) without its own skip.

Meant as F or G of an additive coupling, whose "x1 + F(x2)" already is the residual.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]
group_norm8: NormFactory = partial(nn.GroupNorm, 8)  # the spec's default norm: GroupNorm with 8 groups


class SqueezeExcite3d(nn.Module):
    """Global average pool -> 1x1x1 conv (bias) -> act -> 1x1x1 conv (bias) -> sigmoid -> scale."""

    def __init__(self, channels: int, reduced: int, act: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        self.reduce = nn.Conv3d(channels, reduced, 1, bias=True)
        self.act = act()
        self.expand = nn.Conv3d(reduced, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool3d(x, 1)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConv3d(nn.Module):
    """[1x1x1 expand -> norm -> act] -> kxkxk depthwise -> norm -> act -> [SE] -> linear 1x1x1 -> norm.

    `channels` in = out; the hidden width is `expansion * channels` (no expand conv when 1). Convs
    have no bias (a norm follows each). SE squeezes to max(1, int(se_ratio * channels)) as
    EfficientNet does (0.25 there); 0 turns it off.
    """

    def __init__(self, channels: int, expansion: float = 4.0, kernel_size: int = 3, se_ratio: float = 0.0,
                 norm: NormFactory = group_norm8, act: Callable[[], nn.Module] = nn.SiLU):
        super().__init__()
        mid = round(channels * expansion)
        if mid < 1 or abs(mid - channels * expansion) > 1e-6:
            raise ValueError(f"MBConv3d: expansion {expansion} x {channels} channels must give a whole "
                             "number of hidden channels")
        if kernel_size % 2 == 0:
            raise ValueError(f"MBConv3d: kernel_size must be odd to keep the shape, got {kernel_size}")
        self.expand = (nn.Sequential(nn.Conv3d(channels, mid, 1, bias=False), norm(mid), act())
                       if mid != channels else nn.Identity())
        self.depthwise = nn.Sequential(
            nn.Conv3d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, bias=False), norm(mid), act())
        self.se = SqueezeExcite3d(mid, max(1, int(se_ratio * channels)), act) if se_ratio > 0 else nn.Identity()
        self.project = nn.Sequential(nn.Conv3d(mid, channels, 1, bias=False), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.se(self.depthwise(self.expand(x))))
