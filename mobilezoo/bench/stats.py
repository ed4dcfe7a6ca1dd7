"""Statistics of timed runs: median and interpolated quantiles, in milliseconds."""
from __future__ import annotations

import math
import statistics
from typing import Sequence


def median(xs: Sequence[float]) -> float:
    """The median of `xs`."""
    return statistics.median(xs)


def quantile(xs: Sequence[float], q: float) -> float:
    """The `q` quantile of `xs`, linearly interpolated between the two nearest ranks."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_ms(seconds: Sequence[float], digits: int = 3) -> tuple[float, float]:
    """(median, 90th percentile) of wall times given in seconds, in milliseconds."""
    return round(1e3 * median(seconds), digits), round(1e3 * quantile(seconds, 0.9), digits)
