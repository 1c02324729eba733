"""glibc malloc settings for the step loop: freed tensor memory stays in the heap for the next step.

Every decode step allocates the same few-MB temporaries (logits, probabilities, cumulative sums,
each layer's gathered KV context). glibc serves an allocation above its mmap threshold with a
fresh mapping and unmaps it on free, so each step page-faults its temporaries in again: on a
2-core AMD EPYC guest, the engine stepping on its own thread as it does in the server, a 32-stream
SmolLM2 decode step took 38.5 ms (median of 40 steps, mean of three runs) with glibc's defaults
and 34.9 ms with the settings below. Raising the mmap threshold to 32 MiB
and the trim threshold to 256 MiB keeps freed memory for reuse: the heap stays at the engine's
peak working set (about what one step of the largest batch needs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest mallopt(3) documents for 64-bit systems
TRIM_THRESHOLD = 256 * 2**20


@functools.cache
def keep_freed_memory() -> bool:
    """Applies the settings once per process; False where the C library is not glibc (nothing changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.warning("mallopt refused the step loop's malloc settings; keeping glibc's defaults")
    return ok
