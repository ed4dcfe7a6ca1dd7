"""One registry of model factories, mirrored into timm's so `timm.create_model` finds them too."""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UserError
from . import weights as meta
from .weights import KeyRename, load_weights, read_metadata

_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model name: its task, factory and default input size."""

    name: str
    task: str
    factory: Callable[..., nn.Module]
    input_size: tuple[int, ...]
    checkpoint_filter: KeyRename | None = None  # foreign checkpoint key -> ours (timm's checkpoint_filter_fn)


_REGISTRY: dict[str, ModelEntry] = {}


class UnknownModelError(UserError, ValueError):
    """Raised for a model name that is not registered."""


def register(name: str, task: str, factory: Callable[..., nn.Module],
             input_size: tuple[int, ...], module: str, checkpoint_filter: KeyRename | None = None) -> None:
    """Register `factory` under `name` here and in timm's registry; `checkpoint_filter` renames
    the keys of the family's official checkpoints when `create_model(checkpoint=...)` loads one."""
    _REGISTRY[name] = ModelEntry(name, task, factory, input_size, checkpoint_filter)
    try:
        from timm.models import register_model
    except ImportError:  # timm is optional for the library itself
        return

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name}: mobilezoo downloads nothing; load weights with "
                             "checkpoint=PATH instead of pretrained=True")
        for key in _TIMM_KWARGS:
            kwargs.pop(key, None)
        return factory(**kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    register_model(entrypoint)


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, optionally only those of one task."""
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`, or an error that lists the closest names."""
    if name not in _REGISTRY:
        score = {n: difflib.SequenceMatcher(None, name, n).ratio() for n in _REGISTRY}
        close = sorted((n for n in score if score[n] >= 0.4), key=lambda n: (-score[n], n))[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (see `mobilezoo list`)")
    return _REGISTRY[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name, e.g. `create_model("tiny_moat_0", num_classes=10)`.

    With `checkpoint=FILE`, the weights are loaded strictly; a converted official file also gives
    the model's build arguments (class count, options such as `rel_pos`; `kwargs` win) and, as
    timm's `pretrained_cfg`, the input normalisation and resolution its weights expect."""
    checkpoint = kwargs.pop("checkpoint", None)
    entry = get_entry(name)
    info = read_metadata(checkpoint) if checkpoint is not None else {}
    if meta.META_NUM_CLASSES in info:
        kwargs.setdefault("num_classes", int(info[meta.META_NUM_CLASSES]))
    kwargs = {**json.loads(info.get(meta.META_MODEL_ARGS, "{}")), **kwargs}
    model = entry.factory(**kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint, rename=entry.checkpoint_filter)
    if meta.META_MEAN in info:
        size = int(info.get(meta.META_INPUT_SIZE, entry.input_size[-1]))
        model.pretrained_cfg = {"mean": tuple(json.loads(info[meta.META_MEAN])),
                                "std": tuple(json.loads(info[meta.META_STD])),
                                "input_size": (*entry.input_size[:-2], size, size),
                                "num_classes": kwargs.get("num_classes"), "source": info.get(meta.META_SOURCE)}
    return model
