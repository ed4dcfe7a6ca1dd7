"""Converters for official checkpoints: deeplab2's MOAT, the TF Object Detection API's MobileDets
(TensorFlow checkpoints, read without TensorFlow) and SqueezeTime's PyTorch releases.

`convert_checkpoint` recognises the file, converts every tensor strictly and returns our state
dict with the facts a user of the weights needs (model, input normalisation, resolution), which
`save_converted` writes as the safetensors file's metadata.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..models import create_model
from ..models import weights as meta
from ..models.weights import CheckpointError
from .deeplab2_moat import (
    NORMALIZATIONS,
    RELEASED,
    deeplab2_moat_state_dict,
    has_bn_statistics,
    infer_variant,
    is_deeplab2_moat,
)
from .tensorbundle import TensorBundle, is_tf_checkpoint


@dataclass
class Converted:
    """Our state dict for `model_name(num_classes, **model_args)`, and what the file was."""

    model_name: str
    num_classes: int
    model_args: dict
    state: dict[str, torch.Tensor]
    source: str
    normalization: str  # a key of NORMALIZATIONS
    input_size: int
    weights: str = "raw"  # raw | ema
    bn_statistics: bool = True
    summary: str = ""  # what was read, for the user
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata `create_model(checkpoint=)` and training read back."""
        mean, std = NORMALIZATIONS[self.normalization]
        return {meta.META_MODEL: self.model_name, meta.META_MODEL_ARGS: json.dumps(self.model_args),
                meta.META_NUM_CLASSES: str(self.num_classes), meta.META_SOURCE: self.source,
                meta.META_WEIGHTS: self.weights, meta.META_MEAN: json.dumps(list(mean)),
                meta.META_STD: json.dumps(list(std)), meta.META_INPUT_SIZE: str(self.input_size),
                meta.META_BN_STATS: "present" if self.bn_statistics else "missing"}


def _check_choice(name: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise CheckpointError(f"{name} {value!r}: expected one of {', '.join(map(str, choices))}")


def _size_from_name(path: Path) -> int | None:
    """The resolution a release's name states (e.g. `..._384_...`), if any."""
    found = re.findall(r"(?<![0-9])(224|256|320|384|512)(?![0-9])", str(path))
    return int(found[-1]) if found else None


def _moat(bundle: TensorBundle, tensors, model: str | None, ema: bool, normalization: str | None,
          input_size: int | None) -> Converted:
    where = str(bundle.prefix)
    found, args = infer_variant(tensors)
    if model is not None and found and model != found:
        raise CheckpointError(f"{where}: holds a {found} (by its widths and depths), not a {model}")
    name = model or found
    if not name:
        raise CheckpointError(f"{where}: a deeplab2 MOAT checkpoint whose widths and depths match no known "
                              f"variant; name one with --model")
    head = tensors.get("moat/logits_head/bias")
    num_classes = int(np.shape(head)[0]) if head is not None else 0
    net = create_model(name, num_classes=num_classes, **args)
    state = deeplab2_moat_state_dict(tensors, net, where, ema=ema)
    size, norm = RELEASED[name]
    lowered = str(bundle.prefix).lower()
    if normalization is None and ("22k" in lowered or "1k" in lowered):
        normalization = "inception" if "22k" in lowered else "imagenet"
    out = Converted(name, num_classes, args, state, where, normalization or norm,
                    input_size or _size_from_name(bundle.prefix) or size, "ema" if ema else "raw",
                    has_bn_statistics(tensors))
    if not out.bn_statistics:
        out.notes.append("the file has no BatchNorm moving statistics (an early release): recompute them on "
                         "your data before use (train.bn_recalibrate, or fine-tune)")
    if not args.get("rel_pos", True):
        out.notes.append("no relative-position tables: built with rel_pos=False")
    return out


def _mobiledet(bundle: TensorBundle, tensors, model: str | None, ema: bool, normalization: str | None,
               input_size: int | None) -> Converted:
    from .tfod_mobiledet import ARCH_SCOPES, tfod_mobiledet_state_dict
    where = str(bundle.prefix)
    arch = next((a for a, scope in ARCH_SCOPES.items()
                 if any(n.startswith(f"FeatureExtractor/{scope}/") for n in tensors)), None)
    name = f"ssdlite_mobiledet_{arch}"
    if model is not None and model != name:
        raise CheckpointError(f"{where}: holds an {name} (by its variable scope), not a {model}")
    args = {"background_class": True}
    net = create_model(name, num_classes=90, **args)
    state = tfod_mobiledet_state_dict(tensors, net, arch, where=where, ema=ema)
    return Converted(name, 90, args, state, where, normalization or "inception", input_size or 320,
                     "ema" if ema else "raw")


def _squeezetime(path: Path, model: str | None, normalization: str | None, input_size: int | None) -> Converted:
    from ..models.squeezetime import convert_official, official_to_ours
    from ..models.weights import load_weights
    head = convert_official(path).get("head.weight")
    num_classes = int(head.shape[0]) if head is not None else 0  # 0: a backbone-only file
    name = model or "squeezetime"
    net = load_weights(create_model(name, num_classes=num_classes), path, rename=official_to_ours)
    return Converted(name, num_classes, {}, net.state_dict(), str(path), normalization or "imagenet",
                     input_size or 224)


def convert_checkpoint(path: str | os.PathLike, model: str | None = None, *, ema: bool = False,
                       normalization: str | None = None, input_size: int | None = None) -> Converted:
    """Convert an official checkpoint: a TF checkpoint (prefix, its .index, or a folder holding
    one) of deeplab2 MOAT or the OD API's SSDLite-MobileDet, or a SqueezeTime .pth."""
    _check_choice("normalization", normalization, NORMALIZATIONS)
    path = Path(path)
    if not is_tf_checkpoint(path):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint (expected a TF checkpoint prefix such as "
                                  f"DIR/model.ckpt, a folder holding one, or a SqueezeTime .pth)")
        if ema:
            raise CheckpointError(f"{path}: --ema applies to TensorFlow checkpoints only")
        return _squeezetime(path, model, normalization, input_size)
    bundle = TensorBundle(path)
    tensors = bundle.read_all()
    summary = f"{len(tensors)} tensors, {sum(int(np.size(v)) for v in tensors.values()):,} values"
    if is_deeplab2_moat(tensors):
        out = _moat(bundle, tensors, model, ema, normalization, input_size)
    elif any(n.startswith("FeatureExtractor/MobileDet") for n in tensors):
        out = _mobiledet(bundle, tensors, model, ema, normalization, input_size)
    else:
        first = ", ".join(sorted(tensors)[:3])
        raise CheckpointError(f"{bundle.prefix}: neither a deeplab2 MOAT nor a TF Object Detection API "
                              f"MobileDet checkpoint (first names: {first})")
    out.summary = summary
    return out


def save_converted(converted: Converted, out: str | os.PathLike) -> Path:
    """Write the converted weights as safetensors with their metadata, atomically."""
    from safetensors.torch import save_file
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {out}: expected a .safetensors path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in converted.state.items()}, str(tmp), metadata=converted.metadata())
    os.replace(tmp, out)
    return out
