"""Strict name-by-name conversion of a foreign checkpoint: one rule per state-dict key.

A rule names the source tensors it reads and how they become our tensor (a transpose, a reshape,
a concatenation). `apply_rules` runs them all and reports every missing source, every source no
rule read and every shape that does not fit in one error, as timm's `load_state_dict(strict=True)`
does for its own keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from ..models.weights import CheckpointError

EMA_SUFFIX = "/ExponentialMovingAverage"
# Training bookkeeping a TF checkpoint may hold beside the weights: never part of a model.
_BOOKKEEPING = ("global_step", "_CHECKPOINTABLE_OBJECT_GRAPH")
_OPTIMIZER_SLOTS = ("/Momentum", "/RMSProp", "/RMSProp_1", "/Adam", "/Adam_1")
_LISTED = 20  # names listed per kind of problem before "... and N more"


@dataclass(frozen=True)
class Rule:
    """Our state-dict `key` is `fn(*arrays of sources)`."""

    key: str
    sources: tuple[str, ...]
    fn: Callable[..., np.ndarray]


# The layout changes official TF files need (TF kernels are HWIO, depthwise kernels [kh, kw, C, 1]).
def conv_kernel(w: np.ndarray) -> np.ndarray:
    """HWIO -> OIHW."""
    return w.transpose(3, 2, 0, 1)


def depthwise_kernel(w: np.ndarray) -> np.ndarray:
    """[kh, kw, C, 1] -> [C, 1, kh, kw]."""
    return w.transpose(2, 3, 0, 1)


def dense_kernel(w: np.ndarray) -> np.ndarray:
    """[in, out] (or a 1x1 conv [1, 1, in, out]) -> Linear [out, in]."""
    return w.reshape(-1, w.shape[-1]).T


def same(w: np.ndarray) -> np.ndarray:
    """Unchanged."""
    return w


def batch_norm_rules(ours: str, tf: str, *, gamma: bool = True) -> list[Rule]:
    """The four tensors of a Keras/slim BatchNorm (slim may have no gamma: `gamma=False`)."""
    names = [("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
             ("running_var", "moving_variance")]
    return [Rule(f"{ours}.{a}", (f"{tf}/{b}",), same) for a, b in names if gamma or a != "weight"]


def is_bookkeeping(name: str) -> bool:
    """Step counters and optimizer slots: read by no rule, reported by no error."""
    return name in _BOOKKEEPING or name.endswith(_OPTIMIZER_SLOTS) or any(
        slot + "/" in name for slot in _OPTIMIZER_SLOTS)


def _listed(kind: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"{len(items)} {kind}: " + ", ".join(items[:_LISTED]) + more


def apply_rules(tensors: Mapping[str, np.ndarray], rules: list[Rule], expected: Mapping[str, torch.Tensor],
                where: str, ema: bool = False, keep: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Our state dict from `tensors` by `rules`, strictly against `expected` (the model's state dict).

    With `ema`, a source whose `/ExponentialMovingAverage` copy exists is read from the copy (TF
    keeps copies of trainable variables only; BatchNorm statistics are read raw). The copies not
    chosen are consumed too. Keys in `keep` take the model's own values (e.g. BatchNorm statistics
    a file lacks). Every problem goes into one CheckpointError naming `where`."""
    has_ema = any(n.endswith(EMA_SUFFIX) for n in tensors)
    if ema and not has_ema:
        raise CheckpointError(f"{where}: holds no {EMA_SUFFIX} copies; convert without --ema")
    used, missing, shapes, out = set(), [], [], {}
    ruled = {r.key for r in rules}
    uncovered = [k for k in expected if k not in ruled and k not in keep and not k.endswith("num_batches_tracked")]
    for rule in rules:
        absent = [s for s in rule.sources if s not in tensors]
        if absent:
            missing += absent
            continue
        arrays = []
        for s in rule.sources:
            chosen = s + EMA_SUFFIX if ema and s + EMA_SUFFIX in tensors else s
            used.update((s, s + EMA_SUFFIX))
            arrays.append(np.asarray(tensors[chosen]))
        want = tuple(expected[rule.key].shape) if rule.key in expected else None
        try:
            value = np.ascontiguousarray(rule.fn(*arrays), dtype=np.float32)
        except ValueError:
            value = None
        if want is None:
            uncovered.append(f"{rule.key} (no such key in the model)")
        elif value is None or value.shape != want:
            got = " + ".join(f"{s} {tuple(a.shape)}" for s, a in zip(rule.sources, arrays))
            shapes.append(f"{got} -> {rule.key} {want}")
        else:
            out[rule.key] = torch.from_numpy(value)
    unexpected = sorted(n for n in tensors if n not in used and not is_bookkeeping(n))
    problems = [_listed(kind, items) for kind, items in (
        ("missing tensors", missing), ("unexpected tensors", unexpected),
        ("shape mismatches", shapes), ("model keys no tensor maps to", uncovered)) if items]
    if problems:
        raise CheckpointError(f"{where}: does not fit the model: " + "; ".join(problems))
    for key, value in expected.items():  # counters PyTorch keeps and TF has no notion of, and `keep`
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(value)
        elif key in keep:
            out[key] = value.detach().clone()
    return out
