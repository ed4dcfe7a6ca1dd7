"""Post-norm mobile blocks of MobileDets (TF object-detection API): IBN, fused IBN, Tucker.

Every conv is conv (no bias) -> BN -> activation, projections are linear, the expansion is
relative to the *input* width, and a residual is added only when the layer asks for one
(the official tables switch it off on some same-shape layers)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .conv import ConvNormAct
from .mbconv import SqueezeExcite


def scale_filters(filters: float, multiplier: float = 1.0, base: int = 8) -> int:
    """TF `_scale_filters`: round half up to a multiple of `base`, at least `base` (no 10% rule)."""
    return max(base, base * int(filters * multiplier / base + 0.5))


class MobileBlock(nn.Module):
    """One MobileDet layer: `kind` is ibn, ibn_noexp, fused or tucker (see the spec's block table)."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 expansion: float = 8, ratios: tuple[float, float] = (0.25, 0.25),
                 residual: bool = False, se: bool = False, act: Callable[[], nn.Module] = nn.ReLU6,
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d, padding: str = "same"):
        super().__init__()
        if residual and (stride != 1 or in_ch != out_ch or kind == "ibn_noexp"):
            raise ValueError(f"a residual {kind} layer needs stride 1, in == out and expansion, got "
                             f"stride {stride}, {in_ch} -> {out_ch}")
        cna = dict(norm=norm, act=act, padding=padding)
        if kind == "ibn_noexp":
            hidden = in_ch
            body = [ConvNormAct(in_ch, in_ch, kernel, stride, groups=in_ch, **cna)]
        elif kind == "ibn":
            hidden = int(in_ch * expansion)
            body = [ConvNormAct(in_ch, hidden, 1, **cna),
                    ConvNormAct(hidden, hidden, kernel, stride, groups=hidden, **cna)]
        elif kind == "fused":
            hidden = int(in_ch * expansion)
            body = [ConvNormAct(in_ch, hidden, kernel, stride, **cna)]
        elif kind == "tucker":
            r_in, hidden = scale_filters(in_ch, ratios[0]), scale_filters(out_ch, ratios[1])
            body = [ConvNormAct(in_ch, r_in, 1, **cna), ConvNormAct(r_in, hidden, kernel, stride, **cna)]
            se = False  # the official Tucker block has no SE
        else:
            raise ValueError(f"unknown block type {kind!r}; expected ibn, ibn_noexp, fused or tucker")
        if se:
            body.append(SqueezeExcite(hidden, scale_filters(hidden, 0.25), act=act))
        body.append(ConvNormAct(hidden, out_ch, 1, norm=norm, act=None, padding=padding))
        self.body = nn.Sequential(*body)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y
