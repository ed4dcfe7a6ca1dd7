"""The TF1 Object Detection API's SSDLite-MobileDet checkpoints -> our `ssdlite_mobiledet_<arch>`.

Names, as the OD API builds them (`ssd_mobiledet_feature_extractor.py`, slim's scoping,
`multi_resolution_feature_maps`, the depthwise `ConvolutionalBoxPredictor` heads):

- Backbone, under `FeatureExtractor/<ARCH_SCOPES[arch]>/`: the stem is `Conv`. Every block opens
  `tf.variable_scope(None, default_name=...)`, so blocks are numbered per type in build order
  across the network: `IBN`, `IBN_1`, ..., `IBNNoExpansion`, `FusedConv_N`, `TuckerConv_N`. Inside
  a block slim numbers the full convs `Conv`, `Conv_1`, `Conv_2` in order and names the depthwise
  conv `SeparableConv2d`; the squeeze-excite is `SqueezeExcite/{Conv,Conv_1}` (biases, no BN).
- Extra layer on map i (2..5) of depth d, beside the backbone: `C5_1_Conv2d_i_1x1_<d/2>`, then
  `C5_2_Conv2d_i_3x3_s2_d_depthwise` and `C5_2_Conv2d_i_3x3_s2_d`.
- Heads on map n: `BoxPredictor_n/{BoxEncodingPredictor,ClassPredictor}_depthwise` (depthwise +
  BN) and `BoxPredictor_n/{BoxEncodingPredictor,ClassPredictor}` (biased 1x1).

Kernels are HWIO (`weights`) or [kh, kw, C, 1] (`depthwise_weights`). Both flatten the head
outputs as (y, x, anchor, value) and place anchors alike; only the box code order differs: TF's
FasterRcnnBoxCoder is [ty, tx, th, tw], torchvision's BoxCoder [dx, dy, dw, dh] (both scaled by
10, 10, 5, 5), so each anchor's 4 box channels are permuted. The 91 class slots are kept as they
are (slot 0 background, slot i COCO category id i): build the model with `background_class=True`.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..layers.squeeze_excite import SqueezeExcite
from ..models.ssdlite import SSDLite
from ..models.weights import CheckpointError
from .rules import Rule, apply_rules, batch_norm_rules, conv_kernel, depthwise_kernel, same

ARCH_SCOPES = {"cpu": "MobileDetCPU", "dsp": "MobileDetDSP", "edgetpu": "MobileDetEdgeTPU", "gpu": "MobileDetGPU"}
# Our layer type -> the default scope name TF numbers per type.
BLOCK_SCOPES = {"conv": "Conv", "ibn": "IBN", "ibn_noexp": "IBNNoExpansion", "fused": "FusedConv",
                "tucker": "TuckerConv"}
# Our box code j is TF's code BOX_CODE_FROM_TF[j]: [dx, dy, dw, dh] <- [ty, tx, th, tw].
BOX_CODE_FROM_TF = (1, 0, 3, 2)


def numbered(base: str, n: int) -> str:
    """TF's unique scope names: `base`, `base_1`, `base_2`, ..."""
    return f"{base}_{n}" if n else base


def box_code_order(a: np.ndarray) -> np.ndarray:
    """Permute the first axis (anchor-major groups of 4 TF box codes) into our code order."""
    index = np.arange(a.shape[0]).reshape(-1, 4)[:, BOX_CODE_FROM_TF].reshape(-1)
    return a[index]


def conv_norm_rules(ours: str, layer: nn.Sequential, tf: str) -> list[Rule]:
    """A slim conv (`weights`, or `depthwise_weights` when grouped) and its `BatchNorm`."""
    conv = layer[0]
    if conv.groups > 1:
        rules = [Rule(f"{ours}.0.weight", (f"{tf}/depthwise_weights",), depthwise_kernel)]
    else:
        rules = [Rule(f"{ours}.0.weight", (f"{tf}/weights",), conv_kernel)]
    if conv.bias is not None:
        rules.append(Rule(f"{ours}.0.bias", (f"{tf}/biases",), same))
    if len(layer) > 1 and isinstance(layer[1], nn.BatchNorm2d):
        rules += batch_norm_rules(f"{ours}.1", f"{tf}/BatchNorm")
    return rules


def biased_conv_rules(ours: str, tf: str, order=same) -> list[Rule]:
    """A slim conv with `biases` and no normaliser; `order` reorders its output channels."""
    return [Rule(f"{ours}.weight", (f"{tf}/weights",), lambda w: order(conv_kernel(w))),
            Rule(f"{ours}.bias", (f"{tf}/biases",), order)]


def backbone_rules(backbone: nn.Module, scope: str) -> list[Rule]:
    """The MobileDet backbone's rules: blocks named per type in build order, convs per block."""
    rules, blocks = [], Counter()
    for i, (spec, layer) in enumerate(zip(backbone.arch, backbone.layers)):
        kind = spec["type"]
        block = f"{scope}/{numbered(BLOCK_SCOPES[kind], blocks[kind])}"
        blocks[kind] += 1
        if kind == "conv":
            rules += conv_norm_rules(f"backbone.layers.{i}", layer, block)
            continue
        convs = 0
        for j, part in enumerate(layer.body):
            ours = f"backbone.layers.{i}.body.{j}"
            if isinstance(part, SqueezeExcite):
                rules += biased_conv_rules(f"{ours}.reduce", f"{block}/SqueezeExcite/Conv")
                rules += biased_conv_rules(f"{ours}.expand", f"{block}/SqueezeExcite/Conv_1")
            elif part[0].groups > 1:
                rules += conv_norm_rules(ours, part, f"{block}/SeparableConv2d")
            else:
                rules += conv_norm_rules(ours, part, f"{block}/{numbered('Conv', convs)}")
                convs += 1
    return rules


def extra_layer_rules(model: SSDLite, scope: str) -> list[Rule]:
    """The extra layers, named by their feature-map index after the backbone's C4 and C5."""
    rules, first = [], len(model.box_heads) - len(model.extras)
    for j, extra in enumerate(model.extras):
        i = first + j
        half, k, depth = extra[0][0].out_channels, extra[1][0].kernel_size[0], extra[2][0].out_channels
        shrink = f"{scope}/C5_2_Conv2d_{i}_{k}x{k}_s2_{depth}"
        rules += conv_norm_rules(f"extras.{j}.0", extra[0], f"{scope}/C5_1_Conv2d_{i}_1x1_{half}")
        rules += conv_norm_rules(f"extras.{j}.1", extra[1], f"{shrink}_depthwise")
        rules += conv_norm_rules(f"extras.{j}.2", extra[2], shrink)
    return rules


def head_rules(model: SSDLite) -> list[Rule]:
    """The unshared depthwise box and class heads, one `BoxPredictor_n` per feature map."""
    rules = []
    for n, (box, cls) in enumerate(zip(model.box_heads, model.cls_heads)):
        rules += conv_norm_rules(f"box_heads.{n}.0", box[0], f"BoxPredictor_{n}/BoxEncodingPredictor_depthwise")
        rules += biased_conv_rules(f"box_heads.{n}.1", f"BoxPredictor_{n}/BoxEncodingPredictor", box_code_order)
        rules += conv_norm_rules(f"cls_heads.{n}.0", cls[0], f"BoxPredictor_{n}/ClassPredictor_depthwise")
        rules += biased_conv_rules(f"cls_heads.{n}.1", f"BoxPredictor_{n}/ClassPredictor")
    return rules


def tfod_mobiledet_state_dict(tensors: Mapping[str, np.ndarray], model: SSDLite, arch: str, *,
                              where: str = "TF checkpoint", ema: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict for `model` (`ssdlite_mobiledet_<arch>`, `background_class=True`) from an OD
    API checkpoint's tensors (name -> array), strictly: every model key filled, every tensor used
    but training bookkeeping (`global_step`, optimizer slots). With `ema`, the
    `/ExponentialMovingAverage` copies are read where present (an error if the file has none).
    Every missing name, unused name and shape mismatch is reported in one CheckpointError."""
    if arch not in ARCH_SCOPES:
        raise CheckpointError(f"{where}: unknown MobileDet arch {arch!r}; expected one of {tuple(ARCH_SCOPES)}")
    if not getattr(model, "background", False):
        raise CheckpointError(f"{where}: the OD API's heads have a background slot; build the model "
                              f"with background_class=True")
    scope = f"FeatureExtractor/{ARCH_SCOPES[arch]}"
    rules = backbone_rules(model.backbone, scope) + extra_layer_rules(model, scope) + head_rules(model)
    return apply_rules(tensors, rules, model.state_dict(), where, ema=ema)
