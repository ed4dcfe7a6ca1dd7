"""SqueezeTime building blocks: squeeze time into channels, and the Channel-Time Learning (CTL) bottleneck.

Module and parameter names mirror the official code (`param_conv`, `temporal_conv`, `spatial_conv`,
`glo_conv`, `short_conv`, `pos_embed`, `downsample`, `shortcut_conv`, with the same `nn.Sequential`
indices) so that official state dicts map onto these modules key for key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IOI_HIDDEN = 16  # width of the IOI gate and its position maps; a constant in the official code, not tied to T


def squeeze_time(x: torch.Tensor) -> torch.Tensor:
    """(N, C, T, H, W) -> (N, C*T, H, W), colour-major: channel c*T + t holds colour c of frame t."""
    n, c, t, h, w = x.shape
    return x.reshape(n, c * t, h, w)  # a view for contiguous NCTHW input: no copy


def resize_pos_embed(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The (1, K, p, p) position map as is at its own size, else resized bilinearly (align_corners=True)."""
    if tuple(pos.shape[-2:]) == tuple(size):
        return pos
    return F.interpolate(pos, size=size, mode="bilinear", align_corners=True)


class TemporalImportance(nn.Sequential):
    """beta = sigmoid(1x1(ReLU(BN(1x1(GAP(x)))))), one weight per squeezed channel, C -> C, no reduction."""

    def __init__(self, channels: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False), nn.Sigmoid())


class IOIGate(nn.Module):
    """Inter-temporal object interaction: 3x3(x) * sigmoid(gate(beta * x) with position maps added)."""

    def __init__(self, dim_in: int, dim_out: int, pos_dim: int, hidden: int = IOI_HIDDEN):
        super().__init__()
        self.short_conv = nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.glo_conv = nn.Sequential(
            nn.Conv2d(dim_in, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 7, padding=3), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim_out, 3, padding=1), nn.Sigmoid())
        # Learnable codes for positions of the squeezed time steps ("position restoring").
        self.pos_embed = nn.Parameter(torch.empty(1, hidden, pos_dim, pos_dim))
        nn.init.kaiming_normal_(self.pos_embed, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, x_weighted: torch.Tensor) -> torch.Tensor:
        """`x` feeds the short 3x3 path, `x_weighted` (beta * x) the gate."""
        g = self.glo_conv[:3](x_weighted)
        g = g + resize_pos_embed(self.pos_embed, g.shape[-2:]).to(g.dtype)
        return self.short_conv(x) * self.glo_conv[3:](g)


class CTL(nn.Module):
    """Channel-Time Learning module: TFC(beta * x) + IOI(x, beta * x); C -> C, never strided."""

    def __init__(self, channels: int, pos_dim: int, hidden: int = IOI_HIDDEN):
        super().__init__()
        self.param_conv = TemporalImportance(channels)
        self.temporal_conv = nn.Conv2d(channels, channels, 1, bias=False)  # temporal focus conv (TFC)
        self.spatial_conv = IOIGate(channels, channels, pos_dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xw = x * self.param_conv(x)
        return self.temporal_conv(xw) + self.spatial_conv(x, xw)


def depthwise_downsample(channels: int) -> nn.Sequential:
    """Depthwise 2x2 stride-2 conv (with bias) + BN: how every SqueezeTime stage halves H and W."""
    return nn.Sequential(nn.Conv2d(channels, channels, 2, stride=2, groups=channels), nn.BatchNorm2d(channels))


class CTLBottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 conv is a CTL; strided blocks downsample their input depthwise first."""

    expansion = 4
    fusable = (("conv1", "bn1", "relu1"), ("conv3", "bn3", None))  # for layers.fuse.fuse_for_inference

    def __init__(self, in_ch: int, planes: int, stride: int = 1, pos_dim: int = 7, hidden: int = IOI_HIDDEN):
        super().__init__()
        out_ch = planes * self.expansion
        if stride not in (1, 2):
            raise ValueError(f"CTLBottleneck stride must be 1 or 2, got {stride}")
        # The downsampled input feeds both the main path and the shortcut.
        self.downsample = depthwise_downsample(in_ch) if stride == 2 else None
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = CTL(planes, pos_dim, hidden)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        # One ReLU module per use (no state, so the official keys are unchanged) so that fusion can
        # absorb relu1 into conv1 without touching the others.
        self.relu1, self.relu2, self.relu = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.shortcut_conv = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
                              if in_ch != out_ch else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + (x if self.shortcut_conv is None else self.shortcut_conv(x))
        return self.relu(out)
