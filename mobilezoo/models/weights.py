"""Reading and writing model weights as safetensors, strictly, with every mismatch named."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UserError


class CheckpointError(UserError, ValueError):
    """A weights file that is missing, unreadable, unsafe or does not fit the model."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a plain tensor dict saved by torch (weights only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    obj = safe_torch_load(path, "checkpoint")
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def safe_torch_load(path: Path, what: str):
    """torch.load with weights_only=True; anything else (a pickle carrying code) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unsafe or corrupt pickles
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])  # torch bolds with ANSI codes
        raise CheckpointError(f"{path}: refused: not a weights-only {what} "
                              f"(pickles carrying code are never loaded): {reason}") from None


# Keys of a converted file's safetensors metadata (all values are strings; lists and dicts as JSON).
META_MODEL = "mobilezoo.model"  # registered model name, e.g. "tiny_moat_0"
META_MODEL_ARGS = "mobilezoo.model_args"  # JSON dict of constructor overrides, e.g. {"rel_pos": false}
META_SOURCE = "mobilezoo.source"  # the official file it was converted from
META_WEIGHTS = "mobilezoo.weights"  # "raw" or "ema"
META_MEAN = "mobilezoo.mean"  # JSON list, per channel, for pixels scaled to [0, 1]
META_STD = "mobilezoo.std"
META_INPUT_SIZE = "mobilezoo.input_size"  # side in pixels the weights were trained / evaluated at
META_NUM_CLASSES = "mobilezoo.num_classes"
META_BN_STATS = "mobilezoo.bn_statistics"  # "present" or "missing" (then recalibrate before use)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file ({} for other files or none)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


KeyRename = Callable[[str], "str | None"]  # checkpoint key -> model key, or None to drop it


def rename_keys(state: dict[str, torch.Tensor], rename: KeyRename | None,
                path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(renamed state, model key -> checkpoint key); two checkpoint keys landing on one is an error."""
    if rename is None:
        return state, {k: k for k in state}
    out, origin = {}, {}
    for key, value in state.items():
        new = rename(key)
        if new is None:
            continue
        if new in out:
            raise CheckpointError(f"{path}: keys {origin[new]!r} and {key!r} both map to {new!r}")
        out[new], origin[new] = value, key
    return out, origin


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True,
                 rename: KeyRename | None = None) -> nn.Module:
    """Load weights into `model`; with `strict`, any missing, unexpected or mis-shaped key is an error.

    `rename` maps a foreign checkpoint's keys onto the model's (as timm's `checkpoint_filter_fn`
    does); every mismatch is reported under the key the file holds."""
    state, origin = rename_keys(read_state_dict(path), rename, path)
    _load_state(model, state, origin, path, strict)
    return model


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's task head (its `head_keys()`; none if it names no head)."""
    return list(model.head_keys()) if hasattr(model, "head_keys") else []


@dataclass(frozen=True)
class HeadReset:
    """What `load_pretrained` left at its fresh initialisation: a head sized for other classes."""

    path: str
    keys: tuple[str, ...]
    num_classes: int
    file_classes: int

    def __str__(self) -> str:
        return (f"{self.path}: head re-initialised for {self.num_classes} classes "
                f"(file has {self.file_classes}): {', '.join(self.keys)}")


def load_pretrained(model: nn.Module, path: str | os.PathLike, rename: KeyRename | None = None) -> HeadReset | None:
    """Load pretrained weights strictly, except a head whose class count differs (any of its
    `head_keys` mis-shaped), which keeps its fresh initialisation, as timm does for a new
    `num_classes`; returns that (None when the head loaded too)."""
    state, origin = rename_keys(read_state_dict(path), rename, path)
    own = model.state_dict()
    head = tuple(k for k in head_keys(model) if k in own)
    resized = [k for k in head if k in state and state[k].shape != own[k].shape]
    if not resized:
        _load_state(model, state, origin, path, strict=True)
        return None
    # Classes are counted in logits (an SSD class head has one output row per anchor and logit).
    logits = getattr(model, "num_logits", getattr(model, "num_classes", own[resized[0]].shape[0]))
    rows_per_class = max(1, own[resized[0]].shape[0] // max(1, logits))
    reset = HeadReset(str(path), head, logits, state[resized[0]].shape[0] // rows_per_class)
    _load_state(model, {k: v for k, v in state.items() if k not in head}, origin, path, strict=True,
                fresh=set(head))
    return reset


def load_backbone(model: nn.Module, path: str | os.PathLike) -> str:
    """A classifier's weights (e.g. a converted ImageNet MOAT) into `model.backbone`, a `features_only`
    copy of that classifier, or the backbone of a trained model built on the same backbone (a
    detector's or segmenter's run: its `backbone.*` tensors): every backbone tensor must be in the
    file with its shape; what the file has beyond the backbone (a classifier's final norm and head,
    a detector's heads) is left out and named in the returned line."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise CheckpointError(f"{path}: model.backbone_checkpoint needs a model with a backbone; "
                              f"{type(model).__name__} has none (use model.checkpoint)")
    state, own = read_state_dict(path), backbone.state_dict()
    prefix = "backbone."
    whole = not own.keys() & state.keys() and any(k.startswith(prefix) for k in state)
    if whole:  # every backbone.* tensor is the backbone's (a leftover one is unexpected); the rest left out
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not own.keys() & mine.keys():
            raise CheckpointError(f"{path}: its backbone.* tensors match none of {type(backbone).__name__}'s: a "
                                  f"model on another backbone (name it in model.args.backbone)?")
        extra, origin = [k for k in state if not k.startswith(prefix)], {k: prefix + k for k in mine}
    else:  # a classifier: what is not the backbone's is its final norm and head, left out
        mine = {k: v for k, v in state.items() if k in own}
        extra, origin = [k for k in state if k not in own], {k: k for k in mine}
    _load_state(backbone, mine, origin, path, strict=True)
    prefixes = sorted({k.split(".")[0] for k in extra})
    whose = "model's other parts" if whole else "classifier"
    left = (f"; left out {len(extra)} tensors of the {whose} ({', '.join(p + '.*' for p in prefixes)})"
            if extra else "")
    return f"{path}: {len(own)} backbone tensors loaded into {type(backbone).__name__}{left}"


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], origin: dict[str, str],
                path: str | os.PathLike, strict: bool, fresh: set[str] = frozenset()) -> None:
    """`state` into `model`, every mismatch named in one CheckpointError; keys in `fresh` may be absent."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in fresh]
    unexpected = [origin[k] for k in state if k not in own]
    shapes = [f"{origin[k]} {tuple(state[k].shape)} != {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = []
    if shapes:
        problems.append(f"shape mismatch in {len(shapes)} keys: " + ", ".join(shapes))
    if strict and missing:
        problems.append(f"missing {len(missing)} keys: " + ", ".join(missing))
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict and not fresh)


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state dict as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: weights are written as .safetensors files")
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp))
    os.replace(tmp, path)
