"""SqueezeTime / SQTNet (Zhai et al., 2024), faithful to the official `SqueezeTime.py` (depth 50).

A clip (N, 3, T, H, W) is squeezed into 3T channels (colour-major) and run through a 2D ResNet-50
layout whose 3x3 convs are Channel-Time Learning modules: 5x5/2 stem + 3x3/2 max-pool, CTL
bottlenecks [3, 4, 6, 3], depthwise 2x2/2 downsampling, then GAP -> dropout -> Linear.

`squeezetime_mini` is the same design at 1/4 width and one block per stage, for CPU-sized
experiments on 16x64x64 clips (about 0.7M parameters).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError
from ..layers.temporal import CTLBottleneck, squeeze_time
from .registry import register
from .staged import StagedNet
from .weights import load_weights, read_state_dict, rename_keys


@dataclass(frozen=True)
class SqueezeTimeConfig:
    """One SqueezeTime variant: blocks and bottleneck widths per stage, position-map sides, clip shape."""

    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)  # bottleneck planes; stage output is 4x
    pos_dims: tuple[int, int, int, int] = (56, 28, 14, 7)  # feature sides at the default input size
    num_frames: int = 16
    input_size: int = 224


VARIANTS: dict[str, SqueezeTimeConfig] = {
    # The released K400/K600/HMDB51 network (the official `depth=50`, pos_dim=[56, 28, 14, 7]).
    "squeezetime": SqueezeTimeConfig(),
    # CPU-sized: same blocks, one per stage, 1/4 width; position maps sized for 64x64 clips.
    "squeezetime_mini": SqueezeTimeConfig((1, 1, 1, 1), (16, 32, 64, 128), (16, 8, 4, 2), 16, 64),
}


class ClipShapeError(UserError, ValueError):
    """A clip tensor whose shape is not (N, channels, frames, H, W) for the model it is given to."""


class SqueezeTime(StagedNet):
    """SqueezeTime video classifier / backbone. Input (N, 3, T, H, W), normalised RGB; output (N, classes)."""

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (64, 128, 256, 512),
                 pos_dims: Sequence[int] = (56, 28, 14, 7), num_frames: int = 16, num_classes: int = 400,
                 in_chans: int = 3, dropout: float = 0.5, features_only: bool = False,
                 out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        if not (len(layers) == len(widths) == len(pos_dims) == 4):
            raise ValueError(f"layers, widths and pos_dims need 4 entries each, got {layers}, {widths}, {pos_dims}")
        self.num_frames, self.in_chans = num_frames, in_chans
        self.fusable = (("conv1", "bn1", "relu"),)  # the stem, for layers.fuse.fuse_for_inference
        stem = widths[0]
        self.conv1 = nn.Conv2d(in_chans * num_frames, stem, 5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = stem
        for s, (depth, planes, pos_dim) in enumerate(zip(layers, widths, pos_dims)):
            blocks = []
            for i in range(depth):
                blocks.append(CTLBottleneck(in_ch, planes, 2 if s > 0 and i == 0 else 1, pos_dim))
                in_ch = planes * CTLBottleneck.expansion
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        if not features_only:
            self.drop = nn.Dropout(dropout)
        self.setup_outputs([w * CTLBottleneck.expansion for w in widths], [2 ** (s + 2) for s in range(4)],
                           [f"layer{s + 1}" for s in range(4)], num_classes, features_only, out_indices)
        self.apply(_init_weights)

    def stages(self) -> list[nn.Sequential]:
        """The four CTL stages, layer1..layer4."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    feature_stages = stages

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Check the clip's shape, squeeze time into channels, 5x5/2 conv -> BN -> ReLU -> 3x3/2 max-pool."""
        if x.dim() != 5 or x.shape[1] != self.in_chans or x.shape[2] != self.num_frames:
            raise ClipShapeError(f"SqueezeTime expects (N, {self.in_chans}, {self.num_frames}, H, W) clips, "
                                 f"got {tuple(x.shape)}")
        return self.maxpool(self.relu(self.bn1(self.conv1(squeeze_time(x)))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool -> dropout -> Linear (the official I2DHead)."""
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer groups (as its ResNet's): stem, each block (or stage), then the head."""
        return dict(stem=r"^conv1|^bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")


def _init_weights(m: nn.Module) -> None:
    # Official init: convs kaiming-normal (fan_out, relu) with default biases, BN 1/0, the I2DHead FC
    # N(0, 0.01) with zero bias. Position maps are initialised by IOIGate itself.
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.01)
        nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- official checkpoints

# Official key prefix -> ours. mmaction2 files hold `backbone.<name>` (some show a `backbone.net.`
# wrapper, accepted too; see docs/models/squeezetime.md) and the I2DHead's `cls_head.fc_cls.*`.
_OFFICIAL_PREFIXES = (("backbone.net.", ""), ("backbone.", ""), ("cls_head.fc_cls.", "head."))


def official_to_ours(key: str) -> str:
    """Our state-dict key for an official one (backbone names are identical; the head is `head`)."""
    for old, new in _OFFICIAL_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def is_official_checkpoint(path: str | os.PathLike) -> bool:
    """True for a torch-pickled weights file (.pth/.pt/.ckpt), the format official checkpoints come in."""
    path = Path(path)
    return path.is_file() and path.suffix != ".safetensors"


def convert_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An official SqueezeTime checkpoint (mmaction2 dict or plain state dict) as a state dict in our key layout."""
    return rename_keys(read_state_dict(path), official_to_ours, path)[0]


def load_official(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load an official (or our own) checkpoint; with `strict`, every missing or unexpected key is an error."""
    return load_weights(model, path, strict, rename=official_to_ours)


def _factory(name: str):
    cfg = VARIANTS[name]

    def build(**kwargs) -> SqueezeTime:
        args = dict(layers=cfg.layers, widths=cfg.widths, pos_dims=cfg.pos_dims, num_frames=cfg.num_frames)
        return SqueezeTime(**{**args, **kwargs})
    build.__doc__ = f"{name}: {cfg}"
    return build


for _name, _cfg in VARIANTS.items():
    register(_name, "video", _factory(_name), (3, _cfg.num_frames, _cfg.input_size, _cfg.input_size), __name__,
             checkpoint_filter=official_to_ours)
