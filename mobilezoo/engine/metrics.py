"""Metrics whose state is a dict of tensors, summed over batches and then over ranks."""
from __future__ import annotations

import torch

from .distributed import all_reduce_sum


class SumMetric:
    """Accumulates named tensors by addition; `reduce` sums them across ranks before `compute`."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        """Add `value` (any shape, fixed per key) into the running sum for `key`."""
        value = value.detach().to("cpu", torch.float64)
        self.state[key] = self.state[key] + value if key in self.state else value.clone()

    def reduce(self) -> None:
        """Sum every state tensor over all ranks (keys must be the same on every rank)."""
        for key in sorted(self.state):
            all_reduce_sum(self.state[key])

    def compute(self) -> dict:
        """Final numbers from the summed state; tasks override this."""
        return {k: v.item() for k, v in self.state.items() if v.numel() == 1}
