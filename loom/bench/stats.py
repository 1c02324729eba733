"""Latency statistics and the machine's load, as the benchmark reports them.

Owns the percentile rule (linear interpolation between closest ranks, numpy's default, so a p99
over 32 requests is not just the maximum), the summary of one latency series, and the reading of
`/proc/loadavg`. Pure functions over plain numbers: never times, sends or prints anything.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolated linearly between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Distribution:
    """One latency series in seconds: how many, the mean and p50 / p90 / p99."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float


def summarize(values: Sequence[float]) -> Distribution | None:
    """None for an empty series (no request got that far): a missing number, never a zero."""
    if not values:
        return None
    p50, p90, p99 = (percentile(values, q) for q in PERCENTILES)
    return Distribution(len(values), sum(values) / len(values), p50, p90, p99)


@dataclass(frozen=True, slots=True)
class LoadAverage:
    one: float
    five: float
    fifteen: float

    def __str__(self) -> str:
        return f"{self.one:.2f} {self.five:.2f} {self.fifteen:.2f}"


def parse_loadavg(text: str) -> LoadAverage:
    """`"0.52 0.58 0.59 1/467 12345"` (the format of /proc/loadavg) -> its three averages."""
    one, five, fifteen = (float(field) for field in text.split()[:3])
    return LoadAverage(one, five, fifteen)


def read_loadavg() -> LoadAverage:
    try:
        with open("/proc/loadavg") as f:
            return parse_loadavg(f.read())
    except OSError:  # not Linux: the same numbers through libc
        return LoadAverage(*os.getloadavg())
