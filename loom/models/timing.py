"""Timing kernels against each other at build, to pick the faster on this CPU, and remembering the picks.

`best_times` times the candidates. `measured` runs such a measurement once per machine: with a
store configured (`keep_choices`, which `loom serve` points into its cache directory), the answer
is read from `kernel-choices.json` there, keyed by the question and by this machine as the
kernels see it (CPU model and flags, torch version, thread count), so a restart skips the timing
(~0.3 s for SmolLM2 on 2 cores). A miss, an unreadable file or no store: measured now, after the
configured `before_measuring` hook (the server waits there until its other thread is quiet: a
timing taken beside a busy thread would pick the wrong kernel). Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

STORE_FILE = "kernel-choices.json"
Choice = TypeVar("Choice", bool, int)

_store: Path | None = None
_before_measuring: Callable[[], object] | None = None


def best_times(kernels: Sequence[Callable[[], object]], rounds: int) -> list[float]:
    """Each kernel's fastest wall time over `rounds` interleaved rounds: a busy core slows them all alike."""
    best = [float("inf")] * len(kernels)
    for _ in range(rounds):
        for i, kernel in enumerate(kernels):
            start = time.perf_counter()
            kernel()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def keep_choices(cache_dir: Path | None, before_measuring: Callable[[], object] | None = None) -> None:
    """Where `measured` keeps its answers (None: nowhere, every process measures) and what it calls before measuring."""
    global _store, _before_measuring
    _store = None if cache_dir is None else cache_dir / STORE_FILE
    _before_measuring = before_measuring


def measured(question: str, measure: Callable[[], Choice]) -> Choice:
    """`measure()`'s answer to `question` on this machine: kept from an earlier process, else timed now."""
    key = f"{question} on {machine_fingerprint()}"
    kept = _read().get(key) if _store is not None else None
    if isinstance(kept, bool | int):
        return kept  # type: ignore[return-value]
    if _before_measuring is not None:
        _before_measuring()
    answer = measure()
    if _store is not None:
        _write(key, answer)
    return answer


def cache_dir() -> Path | None:
    """The cache directory `keep_choices` was given (machine-specific artifacts live there too), or None."""
    return None if _store is None else _store.parent


def machine_fingerprint() -> str:
    """What a kernel timing depends on besides the kernels: CPU, torch build and thread count."""
    return f"{cpu_fingerprint()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def cpu_fingerprint() -> str:
    """The CPU as code compiled for it sees it: model, PyTorch's vector capability and the flags' hash."""
    model, flags = _cpu_model_and_flags()
    flags_hash = hashlib.blake2b(flags.encode(), digest_size=6).hexdigest()
    return f"{model} ({torch.backends.cpu.get_cpu_capability()}, flags {flags_hash})"


@functools.cache  # the CPU does not change under a process; the thread count can, so it is read each time
def _cpu_model_and_flags() -> tuple[str, str]:
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return platform.processor() or platform.machine(), ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)}
    return fields.get("model name") or platform.machine(), " ".join(sorted(fields.get("flags", "").split()))


def _read() -> dict[str, object]:
    assert _store is not None
    try:
        data = json.loads(_store.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(key: str, answer: bool | int) -> None:
    """Read, add, write to a temporary file and rename: a reader never sees half a file (two
    processes writing at once may drop one's answer, which is then measured again)."""
    assert _store is not None
    data = _read()
    data[key] = answer
    tmp = _store.with_name(f".{STORE_FILE}.{os.getpid()}.tmp")
    try:
        _store.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, _store)
    except OSError as exc:
        log.warning("not keeping kernel choices in %s: %s", _store, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
