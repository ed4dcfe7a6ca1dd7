"""deeplab2's MOAT / tiny-MOAT checkpoints (TF1-style name-based files) -> our MOAT.

deeplab2 names every variable `moat/<layer>/...`: `stem/conv_0`, `stem/norm_0`, `stem/conv_1`,
`block_SS_BB/{pre_norm, expand_conv, expand_norm, depthwise_conv, depthwise_norm, se/reduce_conv2d,
se/expand_conv2d, shrink_conv, shortcut_conv, attention_norm, attention/{q,k,v,o},
attention/relative_position_embedding}`, `final_layer_norm`, `logits_head`. Attention projections
are per head: q/k/v `[C, heads, head_dim]`, o `[heads, head_dim, C]`; ours is one fused qkv Linear
(q, k, v stacked, head-major) and one output Linear. The relative-position tables are stored at
their fixed size (2P-1)^2 and resized per window at run time, by deeplab2 and by us alike; a
table of another size is resized bilinearly (half-pixel centres, no antialias: `tf.image.resize`).
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..models.moat import MOAT, VARIANTS, MoatBlock
from .rules import Rule, apply_rules, batch_norm_rules, conv_kernel, dense_kernel, depthwise_kernel, same

ROOT = "moat/"
# Input normalisation of the released files, for pixels in [0, 1] (deeplab2's MOAT checkpoint
# table: option 1 is the ImageNet mean/std x 255 on 0..255 pixels, option 2 (x - 127.5) / 127.5).
NORMALIZATIONS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
# What deeplab2 released for each variant: (input size, normalisation). MOAT-2/3/4 exist only as
# ImageNet-22k pre-training fine-tuned on 1k; the others as 1k only.
RELEASED = {"moat_0": (224, "imagenet"), "moat_1": (224, "imagenet"), "moat_2": (384, "inception"),
            "moat_3": (512, "inception"), "moat_4": (512, "inception"), "tiny_moat_0": (256, "imagenet"),
            "tiny_moat_1": (256, "imagenet"), "tiny_moat_2": (256, "imagenet"), "tiny_moat_3": (256, "imagenet")}


def is_deeplab2_moat(names) -> bool:
    """True when the checkpoint's names are deeplab2 MOAT's."""
    return any(n.startswith(ROOT + "block_") for n in names)


def infer_variant(tensors: Mapping[str, np.ndarray]) -> tuple[str, dict]:
    """(variant name, model args) read off the file: stem and stage widths, blocks per stage, and
    whether it has relative-position tables (the "no position embedding" releases have none)."""
    depths = [0, 0, 0, 0]
    widths = [0, 0, 0, 0]
    for name, value in tensors.items():
        m = re.fullmatch(ROOT + r"block_(\d\d)_(\d\d)/shrink_conv/bias", name)
        if m and int(m[1]) < 4:
            s, b = int(m[1]), int(m[2])
            depths[s] = max(depths[s], b + 1)
            widths[s] = int(np.shape(value)[0])
    stem = tensors.get(ROOT + "stem/conv_0/kernel")
    stem_width = int(np.shape(stem)[-1]) if stem is not None else 0
    for name, cfg in VARIANTS.items():
        if (cfg.stem[0], cfg.depths, cfg.widths) == (stem_width, tuple(depths), tuple(widths)):
            rel_pos = any(n.endswith("relative_position_embedding") for n in tensors)
            return name, ({} if rel_pos else {"rel_pos": False})
    return "", {}


def _resize_table(size: tuple[int, int]):
    """A relative-position table [heads, a, b] -> [heads, *size], bilinear as `tf.image.resize`."""
    def fn(table: np.ndarray) -> np.ndarray:
        if table.shape[1:] == size:
            return table
        t = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))[None]
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()
    return fn


def _qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([w.reshape(w.shape[0], -1).T for w in (q, k, v)])


def _qkv_bias(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.concatenate([b.reshape(-1) for b in (q, k, v)])


def _out_proj(o: np.ndarray) -> np.ndarray:
    return o.reshape(-1, o.shape[-1]).T


def _conv(ours: str, tf: str, bias: bool) -> list[Rule]:
    rules = [Rule(f"{ours}.weight", (f"{tf}/kernel",), conv_kernel)]
    return rules + [Rule(f"{ours}.bias", (f"{tf}/bias",), same)] if bias else rules


def _layer_norm(ours: str, tf: str) -> list[Rule]:
    return [Rule(f"{ours}.weight", (f"{tf}/gamma",), same), Rule(f"{ours}.bias", (f"{tf}/beta",), same)]


def _mbconv(ours: str, tf: str, block) -> list[Rule]:
    rules = [*batch_norm_rules(f"{ours}.pre_norm", f"{tf}/pre_norm"),
             *_conv(f"{ours}.expand.0", f"{tf}/expand_conv", bias=False),
             *batch_norm_rules(f"{ours}.expand.1", f"{tf}/expand_norm"),
             Rule(f"{ours}.depthwise.0.weight", (f"{tf}/depthwise_conv/depthwise_kernel",), depthwise_kernel),
             *batch_norm_rules(f"{ours}.depthwise.1", f"{tf}/depthwise_norm"),
             *_conv(f"{ours}.shrink", f"{tf}/shrink_conv", bias=True)]
    if hasattr(block.se, "reduce"):
        rules += [*_conv(f"{ours}.se.reduce", f"{tf}/se/reduce_conv2d", bias=True),
                  *_conv(f"{ours}.se.expand", f"{tf}/se/expand_conv2d", bias=True)]
    if len(block.shortcut) and isinstance(block.shortcut[-1], torch.nn.Conv2d):
        rules += _conv(f"{ours}.shortcut.{len(block.shortcut) - 1}", f"{tf}/shortcut_conv", bias=True)
    return rules


def _attention(ours: str, tf: str, attn) -> list[Rule]:
    a = f"{tf}/attention"
    rules = [*_layer_norm(f"{ours}.norm", f"{tf}/attention_norm"),
             Rule(f"{ours}.qkv.weight", (f"{a}/q/weight", f"{a}/k/weight", f"{a}/v/weight"), _qkv),
             Rule(f"{ours}.qkv.bias", (f"{a}/q/bias", f"{a}/k/bias", f"{a}/v/bias"), _qkv_bias),
             Rule(f"{ours}.proj.weight", (f"{a}/o/weight",), _out_proj),
             Rule(f"{ours}.proj.bias", (f"{a}/o/bias",), same)]
    if attn.rel_table is not None:
        size = tuple(attn.rel_table.shape[1:])
        rules.append(Rule(f"{ours}.rel_table", (f"{a}/relative_position_embedding",), _resize_table(size)))
    return rules


def moat_rules(model: MOAT) -> list[Rule]:
    """One rule per state-dict key of `model` (a classifier: stem, stages, final norm, logits)."""
    rules = [*_conv("stem.0", ROOT + "stem/conv_0", bias=True),
             *batch_norm_rules("stem.1", ROOT + "stem/norm_0"),
             *_conv("stem.3", ROOT + "stem/conv_1", bias=True)]
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            ours, tf = f"stages.{s}.{b}", f"{ROOT}block_{s:02d}_{b:02d}"
            if isinstance(block, MoatBlock):
                rules += _mbconv(f"{ours}.mbconv", tf, block.mbconv) + _attention(f"{ours}.attn", tf, block.attn)
            else:
                rules += _mbconv(ours, tf, block)
    if hasattr(model, "norm"):
        rules += _layer_norm("norm", ROOT + "final_layer_norm")
    if isinstance(getattr(model, "head", None), torch.nn.Linear):
        rules += [Rule("head.weight", (ROOT + "logits_head/kernel",), dense_kernel),
                  Rule("head.bias", (ROOT + "logits_head/bias",), same)]
    return rules


def has_bn_statistics(tensors: Mapping[str, np.ndarray]) -> bool:
    """False for the early releases that lacked the BatchNorm moving statistics."""
    return any(n.endswith("/moving_mean") for n in tensors)


def deeplab2_moat_state_dict(tensors: Mapping[str, np.ndarray], model: MOAT, where: str,
                             ema: bool = False) -> dict[str, torch.Tensor]:
    """Our state dict for `model` from a deeplab2 checkpoint's tensors, strictly; files without
    BatchNorm statistics keep the model's (to be recomputed on data)."""
    rules = moat_rules(model)
    keep = frozenset()
    if not has_bn_statistics(tensors):
        stats = [r for r in rules if r.sources[0].endswith(("/moving_mean", "/moving_variance"))]
        rules = [r for r in rules if r not in stats]
        keep = frozenset(r.key for r in stats)
    return apply_rules(tensors, rules, model.state_dict(), where, ema=ema, keep=keep)
