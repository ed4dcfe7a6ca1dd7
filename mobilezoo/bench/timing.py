"""The one timing loop of the package, and the order in which interleaved rounds visit what they time."""
from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from .stats import median

T = TypeVar("T")


def time_calls(fn: Callable[[object], object], x: object, n: int) -> list[float]:
    """Wall time in seconds of each of `n` calls `fn(x)`."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def share(total: int, rounds: int, i: int) -> int:
    """How many of `total` runs round `i` of `rounds` takes (the first rounds take the remainder)."""
    return total // rounds + (i < total % rounds)


def interleaved_rounds(items: Sequence[T], rounds: int) -> Iterator[tuple[int, list[T]]]:
    """(round index, the items in that round's order): forward in even rounds, reversed in odd ones,
    so that drifting clock speeds and noisy neighbours hit every item alike."""
    items = list(items)
    for i in range(rounds):
        yield i, items if i % 2 == 0 else items[::-1]


def batch1_latency_ms(model: Callable, x: object, runs: int = 20, warmup: int = 2) -> float:
    """Median wall time in ms of one forward of `x` under inference mode, after `warmup` untimed runs."""
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        return 1e3 * median(time_calls(model, x, runs))


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 8) -> float:
    """This machine's matrix-multiply rate on the current thread count: GFLOP/s of the fastest of
    `reps` + 1 products of n x n matrices."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = min(time_calls(lambda pair: torch.mm(*pair), (a, b), reps + 1))
    return 2 * n ** 3 / best / 1e9
