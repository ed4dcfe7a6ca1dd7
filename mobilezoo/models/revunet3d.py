"""Memory-efficient 3D U-Net with reversible MBConv couplings (Pendse et al., BrainLes 2020).

Layout (the paper gives no widths, depths or block settings, so every default below is
mobilezoo's, and an option; docs/models/revunet3d.md says where each comes from):

    stem 3x3x3 conv (no bias) -> per level l: [down: 3x3x3 stride-2 conv + norm] -> encoder sequence
    -> per level from the bottom up: up (2x2x2 stride-2 transposed conv) + encoder output of that level
    (additive skip) -> decoder sequence -> head 1x1x1 conv -> 3 logits.

Every encoder/decoder sequence is a `ReversibleSequence` of additive couplings whose F and G are
two independent `MBConv3d` (1x1x1 expand, 3x3x3 depthwise, linear 1x1x1 projection) on C/2 channels.
Only activations inside the couplings are recomputed; stem, resampling, skips and head store theirs.

Options (keyword arguments of `create_model("revunet3d", ...)`):
    channels        widths per level, default (16, 32, 64, 128): C0 = 16 doubling, 4 levels, so a
                    128^3 crop reaches 16^3 at the bottom. Each must be even (the coupling splits it).
    encoder_blocks  couplings per encoder level, default (1, 1, 2, 4); one entry per level.
    decoder_blocks  couplings per decoder level (top level first), default (1, 1, 1); levels - 1 entries.
    expansion       MBConv expansion t of the C/2-channel input, default 4 (MBConv's usual t in {1, 2, 4, 6}).
    norm            "group" (GroupNorm, 8 groups), "instance" or "batch"; default "group" (no running
                    statistics, fine at batch 1-2). Every C/2 and t*C/2 must divide by 8 for "group".
    act             "silu" (default), "relu", "relu6", "gelu" or "leaky_relu".
    se              squeeze-excite ratio of the MBConv input width, default 0 (off); 0.25 = EfficientNet.
    in_channels     input modalities, default 4 (FLAIR, T1, T1ce, T2: the data loader's order).
    out_channels    output channels, default 3.
    reversible      True: recompute coupling activations in backward; False: plain autograd, same
                    parameters and outputs. `unet3d_mbconv` is this network with reversible=False.

The head returns raw logits, one channel per region in the order REGIONS = (WT, TC, ET); the
sigmoid is applied by the segmentation3d task (its Dice + BCE-with-logits loss and its predictor),
never here, so that the loss can use the numerically stable logit form. Input: N x in_channels x
D x H x W with D, H, W divisible by 2 ** (levels - 1).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..layers.factories import GROUP_NORM_GROUPS, NORMS, get_act, get_norm
from ..layers.mbconv3d import MBConv3d
from ..layers.reversible import AdditiveCoupling, ReversibleSequence, set_reversible
from .registry import register

REGIONS = ("WT", "TC", "ET")  # output channel order of the head (sigmoid per channel, by the task)
GROUPS = GROUP_NORM_GROUPS
ACTIVATIONS = ("silu", "relu", "relu6", "gelu", "leaky_relu")  # names of the shared activation table


class RevUNetError(UserError, ValueError):
    """A model option or an input shape that this U-Net cannot take."""


@dataclass(frozen=True)
class RevUNet3dConfig:
    """One variant: widths and couplings per level, MBConv options, reversible or plain."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    encoder_blocks: tuple[int, ...] = (1, 1, 2, 4)
    decoder_blocks: tuple[int, ...] = (1, 1, 1)
    expansion: float = 4
    norm: str = "group"
    act: str = "silu"
    se: float = 0.0
    reversible: bool = True


VARIANTS: dict[str, RevUNet3dConfig] = {
    "revunet3d": RevUNet3dConfig(),
    "unet3d_mbconv": RevUNet3dConfig(reversible=False),  # the baseline: same network, plain autograd
}


def _check(channels, encoder_blocks, decoder_blocks, expansion, norm, act) -> None:
    if not channels:
        raise RevUNetError("channels needs at least one level")
    if len(encoder_blocks) != len(channels) or len(decoder_blocks) != len(channels) - 1:
        raise RevUNetError(f"{len(channels)} levels need {len(channels)} encoder_blocks and {len(channels) - 1} "
                           f"decoder_blocks, got {tuple(encoder_blocks)} and {tuple(decoder_blocks)}")
    if any(n < 0 for n in (*encoder_blocks, *decoder_blocks)):
        raise RevUNetError(f"block counts must be >= 0, got {tuple(encoder_blocks)} / {tuple(decoder_blocks)}")
    if norm not in NORMS:
        raise RevUNetError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    if act not in ACTIVATIONS:
        raise RevUNetError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    for c in channels:
        if c < 2 or c % 2:
            raise RevUNetError(f"every level width must be even (a coupling splits it in half), got {tuple(channels)}")
        hidden = c // 2 * expansion
        if hidden < 1 or abs(hidden - round(hidden)) > 1e-6:
            raise RevUNetError(f"expansion {expansion} x C/2 = {c // 2} must give a whole number of hidden channels")
        widths = (c, c // 2, round(hidden))
        if norm == "group" and any(w % GROUPS for w in widths):
            raise RevUNetError(f"norm='group' needs C, C/2 and expansion*C/2 divisible by {GROUPS}; level width "
                               f"{c} with expansion {expansion} gives {widths}")


class RevUNet3d(nn.Module):
    """3D U-Net whose levels are (reversible) sequences of MBConv3d couplings; returns logits."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 128), encoder_blocks: Sequence[int] = (1, 1, 2, 4),
                 decoder_blocks: Sequence[int] = (1, 1, 1), expansion: float = 4, norm: str = "group",
                 act: str = "silu", se: float = 0.0, in_channels: int = 4, out_channels: int = 3,
                 reversible: bool = True):
        super().__init__()
        channels, encoder_blocks, decoder_blocks = tuple(channels), tuple(encoder_blocks), tuple(decoder_blocks)
        _check(channels, encoder_blocks, decoder_blocks, expansion, norm, act)
        self.channels, self.in_channels, self.out_channels = channels, in_channels, out_channels
        norm_layer, act_layer = get_norm(norm, dims=3), get_act(act)

        def sequence(c: int, n: int) -> ReversibleSequence:
            mb = partial(MBConv3d, c // 2, expansion, 3, se, norm_layer, act_layer)
            return ReversibleSequence([AdditiveCoupling(mb(), mb()) for _ in range(n)], reversible)

        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1, bias=False)
        self.encoder = nn.ModuleList(sequence(c, n) for c, n in zip(channels, encoder_blocks))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv3d(a, b, 3, stride=2, padding=1, bias=False), norm_layer(b))
            for a, b in zip(channels, channels[1:]))
        self.up = nn.ModuleList(nn.ConvTranspose3d(b, a, 2, stride=2) for a, b in zip(channels, channels[1:]))
        self.decoder = nn.ModuleList(sequence(c, n) for c, n in zip(channels, decoder_blocks))
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    @property
    def reversible(self) -> bool:
        """Whether the couplings recompute their activations in backward."""
        return all(m.reversible for m in self.modules() if isinstance(m, ReversibleSequence))

    @reversible.setter
    def reversible(self, value: bool) -> None:
        set_reversible(self, value)

    def _check_input(self, x: torch.Tensor) -> None:
        factor = 2 ** (len(self.channels) - 1)
        if x.dim() != 5 or x.shape[1] != self.in_channels or any(s % factor for s in x.shape[2:]):
            raise RevUNetError(f"expected input N x {self.in_channels} x D x H x W with D, H, W divisible by "
                               f"{factor} ({len(self.channels)} levels), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits N x out_channels x D x H x W, channels in REGIONS order (sigmoid not applied)."""
        self._check_input(x)
        x = self.stem(x)
        skips = []
        for level, encoder in enumerate(self.encoder):
            if level:
                x = self.down[level - 1](x)
            x = encoder(x)
            skips.append(x)
        for level in reversed(range(len(self.decoder))):
            x = self.decoder[level](self.up[level](x) + skips[level])
        return self.head(x)


def _factory(name: str):
    cfg = VARIANTS[name]

    def build(**kwargs) -> RevUNet3d:
        # timm-style aliases, so create_model(name, num_classes=..., in_chans=...) works as for other families
        if "num_classes" in kwargs:
            kwargs["out_channels"] = kwargs.pop("num_classes")
        if "in_chans" in kwargs:
            kwargs["in_channels"] = kwargs.pop("in_chans")
        return RevUNet3d(**{**asdict(cfg), **kwargs})
    build.__doc__ = f"{name}: {cfg}"
    return build


for _name in VARIANTS:
    register(_name, "segment3d", _factory(_name), (4, 128, 128, 128), __name__)
