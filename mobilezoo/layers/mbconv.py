"""The pre-norm MBConv block (MOAT's mobile convolution)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .conv import AvgPool2dSame, ConvNormAct, make_conv
from .drop import DropPath
from .squeeze_excite import SqueezeExcite

__all__ = ["MBConv", "SqueezeExcite"]  # SqueezeExcite: its home before it served 3-D maps too


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck: BN -> 1x1 -> BN+act -> DW kxk (stride) -> BN+act -> [SE] -> 1x1.

    The expansion is relative to the *output* channels and the projection has a bias and no norm,
    as in MOAT. The shortcut average-pools when strided and projects with a biased 1x1 conv when
    the width changes; the residual branch goes through drop path.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expansion: float = 4.0,
                 kernel_size: int = 3, se_ratio: float = 0.0, pool_size: int = 3,
                 drop_path: float = 0.0, norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
                 act: Callable[[], nn.Module] = nn.GELU, padding: str = "same"):
        super().__init__()
        mid = int(out_ch * expansion)
        self.pre_norm = norm(in_ch)
        self.expand = ConvNormAct(in_ch, mid, 1, norm=norm, act=act, padding=padding)
        self.depthwise = ConvNormAct(mid, mid, kernel_size, stride, groups=mid, norm=norm, act=act,
                                     padding=padding)
        self.se = SqueezeExcite(mid, int(se_ratio * out_ch)) if se_ratio > 0 else nn.Identity()
        self.shrink = make_conv(mid, out_ch, 1, bias=True, padding=padding)
        shortcut = []
        if stride > 1:
            shortcut.append(AvgPool2dSame(pool_size, stride))
        if in_ch != out_ch:
            shortcut.append(nn.Conv2d(in_ch, out_ch, 1, bias=True))
        self.shortcut = nn.Sequential(*shortcut)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.shrink(self.se(self.depthwise(self.expand(self.pre_norm(x)))))
        return self.shortcut(x) + self.drop_path(branch)
