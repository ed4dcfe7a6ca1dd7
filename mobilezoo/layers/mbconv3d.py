"""Shape-preserving 3D inverted bottleneck (MobileNetV2/EfficientNet MBConv) without its own skip.

Meant as F or G of an additive coupling, whose "x1 + F(x2)" already is the residual.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .factories import NormFactory, get_norm
from .squeeze_excite import SqueezeExcite

group_norm8: NormFactory = get_norm("group", dims=3)  # the default norm: GroupNorm with 8 groups


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
        self.se = SqueezeExcite(mid, max(1, int(se_ratio * channels)), act, dims=3) if se_ratio > 0 else nn.Identity()
        self.project = nn.Sequential(nn.Conv3d(mid, channels, 1, bias=False), norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.se(self.depthwise(self.expand(x))))
