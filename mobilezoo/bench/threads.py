"""A torch thread count for one block of code, restored after it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to `n` (None: as it is), then restore it,
    also when the block raises: a benchmark must not leave the process on its own thread count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
