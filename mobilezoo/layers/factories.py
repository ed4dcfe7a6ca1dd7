"""Activation and norm layers by name: the one table every family builds its layers from."""
from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

ActFactory = Callable[[], nn.Module]
NormFactory = Callable[[int], nn.Module]

ACTIVATIONS: dict[str, ActFactory] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid,
}

GROUP_NORM_GROUPS = 8  # GroupNorm's group count wherever a family asks for "group" by name

# name -> (dims -> norm class and the keyword arguments it needs by default)
_NORMS: dict[str, Callable[[int], tuple[type, dict]]] = {
    "batch": lambda dims: ({1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims], {}),
    "group": lambda dims: (nn.GroupNorm, {}),
    "instance": lambda dims: ({1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims],
                              {"affine": True}),
}
NORMS = tuple(_NORMS)


def get_act(name: str) -> ActFactory:
    """The activation class registered under `name` (e.g. "relu6", "hswish", "silu")."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def get_norm(name: str, dims: int = 2, **kwargs) -> NormFactory:
    """A `channels -> norm module` factory: "batch", "group" (8 groups) or "instance" (affine) of `dims`-D maps."""
    if name not in _NORMS:
        raise ValueError(f"unknown norm {name!r}; expected one of {sorted(_NORMS)}")
    cls, defaults = _NORMS[name](dims)
    if cls is nn.GroupNorm:
        return partial(nn.GroupNorm, kwargs.pop("groups", GROUP_NORM_GROUPS), **kwargs)
    return partial(cls, **{**defaults, **kwargs})
