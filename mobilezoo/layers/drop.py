"""Stochastic depth (drop path) and its per-block schedule."""
from __future__ import annotations

import torch
from torch import nn


def survival_schedule(drop_rate: float, num_blocks: int) -> list[float]:
    """Per-block survival 1 - rate * i / N (the official MOAT/EfficientNet schedule, not linspace)."""
    return [1.0 - drop_rate * i / num_blocks for i in range(num_blocks)]


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Zero whole samples of a residual branch with probability `drop_prob`, rescale the rest."""
    if not training or not 0.0 < drop_prob < 1.0:  # as the official code: a no-op outside (0, 1)
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module form of `drop_path`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"
