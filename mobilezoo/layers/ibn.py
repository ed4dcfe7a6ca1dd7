"""Post-norm mobile blocks of MobileDets (TF object-detection API): IBN, fused IBN, Tucker.

Every conv is conv (no bias) -> BN -> activation, projections are linear, the expansion is
relative to the *input* width, and a residual is added only when the layer asks for one
(the official tables switch it off on some same-shape layers)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .conv import ConvNormAct
from .squeeze_excite import SqueezeExcite


def scale_filters(filters: float, multiplier: float = 1.0, base: int = 8) -> int:
    """TF `_scale_filters`: round half up to a multiple of `base`, at least `base` (no 10% rule)."""
    return max(base, base * int(filters * multiplier / base + 0.5))


BLOCK_TYPES = ("ibn", "ibn_noexp", "fused", "tucker")


def conv_plan(kind: str, in_ch: int, out_ch: int, kernel: int, expansion: float = 8,
              ratios: tuple[float, float] = (0.25, 0.25)) -> list[tuple[int, int, bool]]:
    """(output width, kernel, depthwise) of each conv of a block before its projection; the last is strided.

    The one description of the block types: `MobileBlock` builds from it and runs its slices by it."""
    if kind == "ibn_noexp":
        return [(in_ch, kernel, True)]
    if kind == "ibn":
        hidden = int(in_ch * expansion)
        return [(hidden, 1, False), (hidden, kernel, True)]
    if kind == "fused":
        return [(int(in_ch * expansion), kernel, False)]
    if kind == "tucker":
        return [(scale_filters(in_ch, ratios[0]), 1, False), (scale_filters(out_ch, ratios[1]), kernel, False)]
    raise ValueError(f"unknown block type {kind!r}; expected ibn, ibn_noexp, fused or tucker")


class MobileBlock(nn.Module):
    """One MobileDet layer: `kind` is ibn, ibn_noexp, fused or tucker (see `conv_plan`).

    Built at one size, it also runs any smaller configuration of its kind on the leading filters
    and centred kernels of its weights (`sliced`), as once-for-all's dynamic blocks do, so that a
    supernet shares one block per op family at each position."""

    def __init__(self, kind: str, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1,
                 expansion: float = 8, ratios: tuple[float, float] = (0.25, 0.25),
                 residual: bool = False, se: bool = False, act: Callable[[], nn.Module] = nn.ReLU6,
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d, padding: str = "same"):
        super().__init__()
        if residual and (stride != 1 or in_ch != out_ch or kind == "ibn_noexp"):
            raise ValueError(f"a residual {kind} layer needs stride 1, in == out and expansion, got "
                             f"stride {stride}, {in_ch} -> {out_ch}")
        plan = conv_plan(kind, in_ch, out_ch, kernel, expansion, ratios)
        cna = dict(norm=norm, act=act, padding=padding)
        body, c = [], in_ch
        for i, (width, k, depthwise) in enumerate(plan):
            body.append(ConvNormAct(c, width, k, stride if i == len(plan) - 1 else 1,
                                    groups=c if depthwise else 1, **cna))
            c = width
        self.kind, self.has_se = kind, se and kind != "tucker"  # the official Tucker block has no SE
        if self.has_se:
            body.append(SqueezeExcite(c, scale_filters(c, 0.25), act=act))
        body.append(ConvNormAct(c, out_ch, 1, norm=norm, act=None, padding=padding))
        self.body = nn.Sequential(*body)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y

    def sliced(self, x: torch.Tensor, out: int, kernel: int, expansion: float = 8,
               ratios: tuple[float, float] = (0.25, 0.25), residual: bool = False,
               update_stats: bool = True) -> torch.Tensor:
        """The block of this kind for x's width, `out` outputs, `kernel`, `expansion` / `ratios`, on shared weights."""
        plan = conv_plan(self.kind, x.shape[1], out, kernel, expansion, ratios)
        h = x
        for conv, (width, k, _) in zip(self.body, plan):
            h = conv.sliced(h, width, k, update_stats)
        if self.has_se:
            h = self.body[len(plan)].sliced(h, scale_filters(h.shape[1], 0.25))
        y = self.body[-1].sliced(h, out, update_stats=update_stats)
        return x + y if residual else y
