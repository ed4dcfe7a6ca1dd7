"""MobileDet backbones (Xiong et al., CVPR 2021) as data: one JSON-serialisable list of layers each.

A layer is a dict: type (conv | ibn | ibn_noexp | fused | tucker), kernel, stride, out,
expansion (ibn/fused) or ratios [in, out] (tucker), residual, se, act (relu6 | hswish).
The first layer is the stem conv. The SSD endpoints are derived from the strides: C4 is the
last layer at stride 16, C5 the last layer (stride 32). The architecture search writes the same format.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..layers import ConvNormAct
from ..layers.factories import get_act, get_norm
from ..layers.ibn import MobileBlock, scale_filters
from .registry import register

ACTIVATIONS = {name: get_act(name) for name in ("relu6", "hswish")}  # those the MobileDets tables use
LAYER_TYPES = ("conv", "ibn", "ibn_noexp", "fused", "tucker")


_LAYER_CODE = re.compile(r"(conv|ibn_noexp|ibn|fused|tucker)_k(\d+)(?:_s(\d+))?(?:_e(\d+))?"
                         r"(?:_t([\d.]+)-([\d.]+))?_c(\d+)(_r)?")


def decode_layers(code: str, act: str, se: bool) -> list[dict]:
    """Layer dicts from a compact code, one token per layer as timm's block strings: type, kernel
    `k`, stride `s` (default 1), expansion `e` (ibn/fused), Tucker ratios `t<in>-<out>`, output
    width `c`, `_r` for a residual layer; e.g. `ibn_k5_s2_e8_c72` or `tucker_k3_t0.25-0.75_c32_r`."""
    layers = []
    for token in code.split():
        m = _LAYER_CODE.fullmatch(token)
        if m is None:
            raise ValueError(f"bad layer code {token!r}")
        kind, k, s, e, r_in, r_out, c, res = m.groups()
        layer = {"type": kind, "kernel": int(k), "stride": int(s or 1), "out": int(c), "residual": bool(res),
                 "act": act, "se": se and kind not in ("conv", "tucker")}
        if kind == "tucker":
            layer["ratios"] = [float(r_in), float(r_out)]
        elif kind in ("ibn", "fused"):
            layer["expansion"] = int(e)
        layers.append(layer)
    return layers


# Transcribed from TF's ssd_mobiledet_feature_extractor.py (the MobileDets release), one line per block.
ARCHS: dict[str, list[dict]] = {
    "cpu": decode_layers("""
        conv_k3_s2_c16 ibn_noexp_k3_c8
        ibn_k3_s2_e4_c16
        ibn_k3_s2_e8_c32 ibn_k3_e4_c32_r ibn_k3_e4_c32_r ibn_k3_e4_c32_r
        ibn_k5_s2_e8_c72 ibn_k3_e8_c72_r ibn_k5_e4_c72_r ibn_k3_e4_c72_r
        ibn_k3_e8_c72 ibn_k3_e8_c72_r ibn_k3_e8_c72_r ibn_k3_e8_c72_r
        ibn_k5_s2_e8_c104 ibn_k5_e4_c104_r ibn_k5_e4_c104_r ibn_k3_e4_c104_r
        ibn_k3_e8_c144
    """, "hswish", se=True),
    "dsp": decode_layers("""
        conv_k3_s2_c32 ibn_noexp_k3_c24
        fused_k3_s2_e4_c32 fused_k3_e4_c32_r ibn_k3_e4_c32_r tucker_k3_t0.25-0.75_c32_r
        fused_k3_s2_e8_c64 ibn_k3_e4_c64_r fused_k3_e4_c64_r fused_k3_e4_c64_r
        fused_k3_s2_e8_c120 ibn_k3_e4_c120_r ibn_k3_e8_c120_r ibn_k3_e8_c120_r
        fused_k3_e8_c144 ibn_k3_e8_c144_r ibn_k3_e8_c144_r ibn_k3_e8_c144_r
        ibn_k3_s2_e4_c160 ibn_k3_e4_c160_r fused_k3_e4_c160_r tucker_k3_t0.75-0.75_c160_r
        ibn_k3_e8_c240
    """, "relu6", se=False),
    "edgetpu": decode_layers("""
        conv_k3_s2_c32 tucker_k3_t0.25-0.75_c16
        fused_k3_s2_e8_c16 fused_k3_e4_c16_r fused_k3_e8_c16_r fused_k3_e4_c16_r
        fused_k5_s2_e8_c40 fused_k3_e4_c40_r fused_k3_e4_c40_r fused_k3_e4_c40_r
        ibn_k3_s2_e8_c72 ibn_k3_e8_c72_r fused_k3_e4_c72_r fused_k3_e4_c72_r
        ibn_k5_e8_c96 ibn_k5_e8_c96_r ibn_k3_e8_c96_r ibn_k3_e8_c96_r
        ibn_k5_s2_e8_c120 ibn_k3_e8_c120_r ibn_k5_e4_c120_r ibn_k3_e8_c120_r
        ibn_k5_e8_c384
    """, "relu6", se=False),
    "gpu": decode_layers("""
        conv_k3_s2_c32 tucker_k3_t0.25-0.25_c16
        fused_k3_s2_e8_c32 tucker_k3_t0.25-0.25_c32_r tucker_k3_t0.25-0.25_c32_r tucker_k3_t0.25-0.25_c32_r
        fused_k3_s2_e8_c64 fused_k3_e8_c64_r fused_k3_e8_c64_r fused_k3_e4_c64_r
        fused_k3_s2_e8_c128 fused_k3_e4_c128_r fused_k3_e4_c128_r fused_k3_e4_c128_r
        fused_k3_e8_c128 fused_k3_e8_c128_r fused_k3_e8_c128_r fused_k3_e8_c128_r
        fused_k3_s2_e4_c128 fused_k3_e4_c128_r fused_k3_e4_c128_r fused_k3_e4_c128_r
        ibn_k3_e8_c384
    """, "relu6", se=False),
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


def _check(cond: bool, i: int, name: str, expected: str, layer: dict) -> None:
    if not cond:
        raise UserError(f"architecture layer {i}: field '{name}' must be {expected}, got {layer.get(name)!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_arch(arch) -> list[dict]:
    """`load_arch` plus a check of every field; errors name the layer and field."""
    arch = load_arch(arch)
    c_in = None
    for i, layer in enumerate(arch):
        if not isinstance(layer, dict):
            raise UserError(f"architecture layer {i}: expected an object, got {layer!r}")
        t = layer["type"]
        _check(t in LAYER_TYPES, i, "type", f"one of {LAYER_TYPES}", layer)
        _check(_is_int(layer["kernel"]) and layer["kernel"] in (1, 3, 5, 7), i, "kernel", "1, 3, 5 or 7", layer)
        _check(layer["stride"] in (1, 2) and _is_int(layer["stride"]), i, "stride", "1 or 2", layer)
        _check(_is_int(layer["out"]) and layer["out"] > 0, i, "out", "a positive int", layer)
        _check(isinstance(layer.get("residual", False), bool), i, "residual", "true or false", layer)
        _check(isinstance(layer.get("se", False), bool), i, "se", "true or false", layer)
        if t in ("ibn", "fused"):
            e = layer.get("expansion", 8)
            _check(isinstance(e, (int, float)) and not isinstance(e, bool) and e > 1, i, "expansion",
                   "a number > 1", layer)
        if t == "tucker":
            r = layer.get("ratios", [0.25, 0.25])
            _check(isinstance(r, (list, tuple)) and len(r) == 2
                   and all(isinstance(v, (int, float)) and 0 < v <= 1 for v in r), i, "ratios",
                   "two numbers in (0, 1]", layer)
        if layer.get("residual", False):
            _check(t not in ("conv", "ibn_noexp") and layer["stride"] == 1 and layer["out"] == c_in, i,
                   "residual", f"false unless stride 1, out == in ({c_in}) and an ibn/fused/tucker layer", layer)
        c_in = layer["out"]
    endpoints(arch)
    return arch


def init_tf_he_normal(m: nn.Module) -> None:
    """TF1 he_normal init of a conv (truncated normal), zero biases: the MobileDet backbone's init."""
    # TF1 he_normal (truncated, std sqrt(2/fan_in)/0.8796); depthwise: fan_in = k*k. Biases 0.
    if isinstance(m, nn.Conv2d):
        fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        std = (2.0 / fan_in) ** 0.5 / 0.87962566103423978
        nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MobileDetBackbone(nn.Module):
    """Stem + mobile blocks from an architecture list; returns the maps of `feature_info` at `out_indices`
    (timm's convention): the last layer at each stride 2, 4, 8, 16, 32; by default [C4, C5] (strides
    16 and 32), SSDLite's inputs."""

    def __init__(self, arch="cpu", in_chans: int = 3, multiplier: float = 1.0, bn_eps: float = 0.01,
                 bn_momentum: float = 0.01, padding: str = "same", out_indices=(3, 4)):
        super().__init__()
        self.arch = load_arch(arch)
        norm = get_norm("batch", eps=bn_eps, momentum=bn_momentum)
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
        endpoints(self.arch)  # checks that it reaches strides 16 and 32
        last, stride = {}, 1
        for i, spec in enumerate(self.arch):
            stride *= spec["stride"]
            last[stride] = i
        self.feature_info = [dict(num_chs=scale_filters(self.arch[i]["out"], multiplier), reduction=r,
                                  module=f"layers.{i}") for r, i in last.items() if r > 1]
        if not all(isinstance(i, int) and 0 <= i < len(self.feature_info) for i in out_indices):
            raise UserError(f"out_indices: expected indices of the maps at strides "
                            f"{', '.join(str(f['reduction']) for f in self.feature_info)}; got {list(out_indices)}")
        self.out_indices = tuple(sorted(out_indices))
        self._taps = [last[self.feature_info[i]["reduction"]] for i in self.out_indices]
        self.apply(init_tf_he_normal)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self._taps:
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
