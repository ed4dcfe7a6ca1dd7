"""MOAT and tiny-MOAT (Yang et al., ICLR 2023), faithful to deeplab2's `moat.py`.

Stem (two 3x3 convs) -> two stages of MBConv blocks with SE -> two stages of MOAT blocks
(MBConv without SE, then pre-LN relative-position attention, no MLP) -> pool -> LN -> Linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..layers import DropPath, MBConv, RelPosAttention2d, make_conv, survival_schedule
from ..layers.factories import get_norm
from .registry import register
from .staged import StagedNet


@dataclass(frozen=True)
class MoatConfig:
    """One MOAT variant: stem widths, blocks and widths per stage, default drop-path rate."""

    stem: tuple[int, int]
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int]
    drop_path: float  # 1 - survival_prob of the released checkpoint


VARIANTS: dict[str, MoatConfig] = {
    "moat_0": MoatConfig((64, 64), (2, 3, 7, 2), (96, 192, 384, 768), 0.2),
    "moat_1": MoatConfig((64, 64), (2, 6, 14, 2), (96, 192, 384, 768), 0.3),
    "moat_2": MoatConfig((128, 128), (2, 6, 14, 2), (128, 256, 512, 1024), 0.3),
    "moat_3": MoatConfig((160, 160), (2, 12, 28, 2), (160, 320, 640, 1280), 0.6),
    "moat_4": MoatConfig((256, 256), (2, 12, 28, 2), (256, 512, 1024, 2048), 0.7),
    "tiny_moat_0": MoatConfig((32, 32), (2, 3, 7, 2), (32, 64, 128, 256), 0.0),
    "tiny_moat_1": MoatConfig((40, 40), (2, 3, 7, 2), (40, 80, 160, 320), 0.0),
    "tiny_moat_2": MoatConfig((56, 56), (2, 3, 7, 2), (56, 112, 224, 448), 0.0),
    "tiny_moat_3": MoatConfig((80, 80), (2, 3, 7, 2), (80, 160, 320, 640), 0.1),
}

BLOCK_TYPES = ("mbconv", "mbconv", "moat", "moat")
POS_SIZES = (None, None, 14, 7)  # fixed rel-pos table side P at stride 16 / 32: tables are (2P-1)^2


class MoatBlock(nn.Module):
    """MBConv (no SE) followed by the attention half of a Transformer block: x + DP(attn(LN(x)))."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, window, pos_size: int | None,
                 drop_path: float, norm, pool_size: int, padding: str):
        super().__init__()
        self.mbconv = MBConv(in_ch, out_ch, stride, pool_size=pool_size, drop_path=drop_path,
                             norm=norm, padding=padding)
        self.attn = RelPosAttention2d(out_ch, window=window, pos_size=pos_size)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mbconv(x)
        return x + self.drop_path(self.attn(x))


class MOAT(StagedNet):
    """MOAT classifier / backbone. Input NCHW with sides a multiple of 32 (or of 32 x window)."""

    def __init__(self, cfg: MoatConfig, num_classes: int = 1000, in_chans: int = 3,
                 rel_pos: bool = True, window_size: Sequence | None = None,
                 global_attention_at_end_of_stage: bool = False, pool_size: int = 3,
                 drop_path_rate: float | None = None, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3), bn_eps: float = 1e-3,
                 bn_momentum: float = 0.01, padding: str = "same"):
        super().__init__()
        windows = list(window_size) if window_size is not None else [None] * 4
        if len(windows) != 4:
            raise ValueError(f"window_size needs one entry per stage (4), got {window_size!r}")
        norm = get_norm("batch", eps=bn_eps, momentum=bn_momentum)
        self.cfg = cfg
        self.stem = nn.Sequential(
            make_conv(in_chans, cfg.stem[0], 3, 2, bias=True, padding=padding),
            norm(cfg.stem[0]), nn.GELU(),
            make_conv(cfg.stem[0], cfg.stem[1], 3, 1, bias=True, padding=padding))
        rate = cfg.drop_path if drop_path_rate is None else drop_path_rate
        survival = iter(survival_schedule(rate, sum(cfg.depths)))
        stages, in_ch = [], cfg.stem[1]
        for s, (kind, depth, width) in enumerate(zip(BLOCK_TYPES, cfg.depths, cfg.widths)):
            blocks = []
            for i in range(depth):
                stride, dp = (2 if i == 0 else 1), 1.0 - next(survival)
                if kind == "mbconv":
                    blocks.append(MBConv(in_ch, width, stride, se_ratio=0.25, pool_size=pool_size,
                                         drop_path=dp, norm=norm, padding=padding))
                else:
                    last = i == depth - 1 and global_attention_at_end_of_stage
                    blocks.append(MoatBlock(in_ch, width, stride, None if last else windows[s],
                                            POS_SIZES[s] if rel_pos else None, dp, norm,
                                            pool_size, padding))
                in_ch = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        if not features_only:  # before the head, so that parameters (and optimizer states) keep their order
            self.norm = nn.LayerNorm(cfg.widths[-1], eps=1e-5)
        self.setup_outputs(cfg.widths, [2 ** (s + 2) for s in range(4)], [f"stages.{s}" for s in range(4)],
                           num_classes, features_only, out_indices)
        self.apply(_init_weights)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """The two stem convs (stride 2)."""
        return self.stem(x)

    def feature_stages(self) -> nn.ModuleList:
        """The four stages: two of MBConv blocks, two of MOAT blocks."""
        return self.stages

    def stage_output(self, x: torch.Tensor) -> torch.Tensor:
        # The blocks' outputs are pre-activation; the official backbone applies GELU to its endpoints.
        return nn.functional.gelu(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool -> LayerNorm -> Linear (pool first, as the official head does)."""
        x = self.norm(x.mean((2, 3)))
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups (layer-wise lr decay): stem, each block (or stage), final norm, then the head."""
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                                          (r"^norm", (99999,))])


def _init_weights(m: nn.Module) -> None:
    # Every conv/dense kernel and the rel-pos tables ~ N(0, 0.02), biases 0 (deeplab2 defaults).
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, RelPosAttention2d) and m.rel_table is not None:
        nn.init.normal_(m.rel_table, std=0.02)


MOAT.init_weights = staticmethod(_init_weights)


def _factory(name: str):
    def build(**kwargs) -> MOAT:
        return MOAT(VARIANTS[name], **kwargs)
    build.__doc__ = f"{name}: {VARIANTS[name]}"
    return build


for _name in VARIANTS:
    register(_name, "classify", _factory(_name), (3, 224, 224), __name__)
