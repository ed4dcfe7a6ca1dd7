"""MobileDet backbones (Xiong et al., CVPR 2021) as data: one JSON-serialisable list of layers each.

A layer is a dict: type (conv | ibn | ibn_noexp | fused | tucker), kernel, stride, out,
expansion (ibn/fused) or ratios [in, out] (tucker), residual, se, act (relu6 | hswish).
The first layer is the stem conv. The SSD endpoints are derived from the strides: C4 is the
last layer at stride 16, C5 the last layer (stride 32). The search (issue 7) writes the same format.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..layers import ConvNormAct
from ..layers.ibn import MobileBlock, scale_filters
from .registry import register

ACTIVATIONS = {"relu6": nn.ReLU6, "hswish": nn.Hardswish}
LAYER_TYPES = ("conv", "ibn", "ibn_noexp", "fused", "tucker")


def _layers(rows, act: str, se: bool) -> list[dict]:
    """Expand compact rows (type, kernel, stride, expansion|ratios, out, residual) into layer dicts."""
    out = []
    for kind, k, s, e, c, res in rows:
        layer = {"type": kind, "kernel": k, "stride": s, "out": c, "residual": res, "act": act,
                 "se": se and kind not in ("conv", "tucker")}
        if kind == "tucker":
            layer["ratios"] = list(e)
        elif kind in ("ibn", "fused"):
            layer["expansion"] = e
        out.append(layer)
    return out


Y, N = True, False
# Transcribed from ssd_mobiledet_feature_extractor.py (spec §2.2-2.5).
ARCHS: dict[str, list[dict]] = {
    "cpu": _layers([
        ("conv", 3, 2, None, 16, N), ("ibn_noexp", 3, 1, 1, 8, N),
        ("ibn", 3, 2, 4, 16, N),
        ("ibn", 3, 2, 8, 32, N), ("ibn", 3, 1, 4, 32, Y), ("ibn", 3, 1, 4, 32, Y), ("ibn", 3, 1, 4, 32, Y),
        ("ibn", 5, 2, 8, 72, N), ("ibn", 3, 1, 8, 72, Y), ("ibn", 5, 1, 4, 72, Y), ("ibn", 3, 1, 4, 72, Y),
        ("ibn", 3, 1, 8, 72, N), ("ibn", 3, 1, 8, 72, Y), ("ibn", 3, 1, 8, 72, Y), ("ibn", 3, 1, 8, 72, Y),
        ("ibn", 5, 2, 8, 104, N), ("ibn", 5, 1, 4, 104, Y), ("ibn", 5, 1, 4, 104, Y), ("ibn", 3, 1, 4, 104, Y),
        ("ibn", 3, 1, 8, 144, N),
    ], "hswish", se=True),
    "dsp": _layers([
        ("conv", 3, 2, None, 32, N), ("ibn_noexp", 3, 1, 1, 24, N),
        ("fused", 3, 2, 4, 32, N), ("fused", 3, 1, 4, 32, Y), ("ibn", 3, 1, 4, 32, Y),
        ("tucker", 3, 1, (0.25, 0.75), 32, Y),
        ("fused", 3, 2, 8, 64, N), ("ibn", 3, 1, 4, 64, Y), ("fused", 3, 1, 4, 64, Y), ("fused", 3, 1, 4, 64, Y),
        ("fused", 3, 2, 8, 120, N), ("ibn", 3, 1, 4, 120, Y), ("ibn", 3, 1, 8, 120, Y), ("ibn", 3, 1, 8, 120, Y),
        ("fused", 3, 1, 8, 144, N), ("ibn", 3, 1, 8, 144, Y), ("ibn", 3, 1, 8, 144, Y), ("ibn", 3, 1, 8, 144, Y),
        ("ibn", 3, 2, 4, 160, N), ("ibn", 3, 1, 4, 160, Y), ("fused", 3, 1, 4, 160, Y),
        ("tucker", 3, 1, (0.75, 0.75), 160, Y),
        ("ibn", 3, 1, 8, 240, N),
    ], "relu6", se=False),
    "edgetpu": _layers([
        ("conv", 3, 2, None, 32, N), ("tucker", 3, 1, (0.25, 0.75), 16, N),
        ("fused", 3, 2, 8, 16, N), ("fused", 3, 1, 4, 16, Y), ("fused", 3, 1, 8, 16, Y), ("fused", 3, 1, 4, 16, Y),
        ("fused", 5, 2, 8, 40, N), ("fused", 3, 1, 4, 40, Y), ("fused", 3, 1, 4, 40, Y), ("fused", 3, 1, 4, 40, Y),
        ("ibn", 3, 2, 8, 72, N), ("ibn", 3, 1, 8, 72, Y), ("fused", 3, 1, 4, 72, Y), ("fused", 3, 1, 4, 72, Y),
        ("ibn", 5, 1, 8, 96, N), ("ibn", 5, 1, 8, 96, Y), ("ibn", 3, 1, 8, 96, Y), ("ibn", 3, 1, 8, 96, Y),
        ("ibn", 5, 2, 8, 120, N), ("ibn", 3, 1, 8, 120, Y), ("ibn", 5, 1, 4, 120, Y), ("ibn", 3, 1, 8, 120, Y),
        ("ibn", 5, 1, 8, 384, N),
    ], "relu6", se=False),
    "gpu": _layers([
        ("conv", 3, 2, None, 32, N), ("tucker", 3, 1, (0.25, 0.25), 16, N),
        ("fused", 3, 2, 8, 32, N), *[("tucker", 3, 1, (0.25, 0.25), 32, Y)] * 3,
        ("fused", 3, 2, 8, 64, N), ("fused", 3, 1, 8, 64, Y), ("fused", 3, 1, 8, 64, Y), ("fused", 3, 1, 4, 64, Y),
        ("fused", 3, 2, 8, 128, N), *[("fused", 3, 1, 4, 128, Y)] * 3,
        ("fused", 3, 1, 8, 128, N), *[("fused", 3, 1, 8, 128, Y)] * 3,
        ("fused", 3, 2, 4, 128, N), *[("fused", 3, 1, 4, 128, Y)] * 3,
        ("ibn", 3, 1, 8, 384, N),
    ], "relu6", se=False),
}


def load_arch(arch) -> list[dict]:
    """An architecture: a variant name, a JSON file path, or the list itself; validated."""
    if isinstance(arch, str) and arch in ARCHS:
        return ARCHS[arch]
    if isinstance(arch, (str, Path)):
        path = Path(arch)
        try:
            arch = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read architecture JSON ({e})") from None
        if isinstance(arch, dict):
            arch = arch.get("layers")
    if not isinstance(arch, list) or not arch:
        raise UserError(f"architecture must be a non-empty list of layers, got {type(arch).__name__}")
    for i, layer in enumerate(arch):
        missing = {"type", "kernel", "stride", "out"} - set(layer)
        if missing or layer.get("type") not in LAYER_TYPES or layer.get("act", "relu6") not in ACTIVATIONS:
            raise UserError(f"architecture layer {i}: expected type in {LAYER_TYPES}, kernel, stride, "
                            f"out, act in {tuple(ACTIVATIONS)}; got {layer}")
    if arch[0]["type"] != "conv":
        raise UserError("architecture layer 0 must be the stem conv")
    return arch


def endpoints(arch: list[dict]) -> tuple[int, int]:
    """Indices of the C4 (last layer at stride 16) and C5 (last layer) endpoints."""
    stride, c4 = 1, None
    for i, layer in enumerate(arch):
        stride *= layer["stride"]
        if stride == 16:
            c4 = i
    if c4 is None or stride != 32:
        raise UserError(f"architecture must reach stride 16 and end at stride 32 (ends at {stride})")
    return c4, len(arch) - 1


def _init_backbone(m: nn.Module) -> None:
    # TF1 he_normal (truncated, std sqrt(2/fan_in)/0.8796); depthwise: fan_in = k*k. Biases 0.
    if isinstance(m, nn.Conv2d):
        fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        std = (2.0 / fan_in) ** 0.5 / 0.87962566103423978
        nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MobileDetBackbone(nn.Module):
    """Stem + mobile blocks from an architecture list; returns the [C4, C5] feature maps."""

    def __init__(self, arch="cpu", in_chans: int = 3, multiplier: float = 1.0, bn_eps: float = 0.01,
                 bn_momentum: float = 0.01, padding: str = "same"):
        super().__init__()
        self.arch = load_arch(arch)
        norm = partial(nn.BatchNorm2d, eps=bn_eps, momentum=bn_momentum)
        layers, c = [], in_chans
        for spec in self.arch:
            out = scale_filters(spec["out"], multiplier)
            act = ACTIVATIONS[spec.get("act", "relu6")]
            if spec["type"] == "conv":
                layers.append(ConvNormAct(c, out, spec["kernel"], spec["stride"], norm=norm, act=act,
                                          padding=padding))
            else:
                layers.append(MobileBlock(spec["type"], c, out, spec["kernel"], spec["stride"],
                                          spec.get("expansion", 8), tuple(spec.get("ratios", (0.25, 0.25))),
                                          spec.get("residual", False), spec.get("se", False), act, norm,
                                          padding))
            c = out
        self.layers = nn.ModuleList(layers)
        self.c4, self.c5 = endpoints(self.arch)
        widths = [scale_filters(s["out"], multiplier) for s in self.arch]
        self.feature_info = [dict(num_chs=widths[self.c4], reduction=16, module=f"layers.{self.c4}"),
                             dict(num_chs=widths[self.c5], reduction=32, module=f"layers.{self.c5}")]
        self.apply(_init_backbone)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in (self.c4, self.c5):
                feats.append(x)
        return feats


def _backbone_factory(name: str):
    def build(**kwargs) -> MobileDetBackbone:
        kwargs.pop("num_classes", None)
        kwargs.pop("features_only", None)
        return MobileDetBackbone(name, **kwargs)
    return build


for _name in ARCHS:
    register(f"mobiledet_{_name}", "backbone", _backbone_factory(_name), (3, 320, 320), __name__)
