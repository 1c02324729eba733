"""Timing two or more kernels against each other once at build, to pick the faster on this CPU."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence


def best_times(kernels: Sequence[Callable[[], object]], rounds: int) -> list[float]:
    """Each kernel's fastest wall time over `rounds` interleaved rounds: a busy core slows them all alike."""
    best = [float("inf")] * len(kernels)
    for _ in range(rounds):
        for i, kernel in enumerate(kernels):
            start = time.perf_counter()
            kernel()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
