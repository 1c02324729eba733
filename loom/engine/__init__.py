"""Loom's inference engine: continuous batching over a paged KV cache, batched sampling.

Public surface: `AsyncEngine`, `SamplingParams`, `RequestOutput`, `EngineConfig`, `build_engine`.
Never imports HTTP, JSON schemas or money.

The names are imported on first use, so `loom.engine.config` (what the CLI's parser needs) does
not import torch: `loom serve` starts importing it on the engine's side while the web stack loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loom.engine.async_engine import AsyncEngine, EngineError, EngineStats, RequestOutput
    from loom.engine.config import EngineConfig
    from loom.engine.factory import build_engine
    from loom.engine.sampling_params import SamplingParams

_HOMES = {
    "AsyncEngine": "async_engine",
    "EngineError": "async_engine",
    "EngineStats": "async_engine",
    "RequestOutput": "async_engine",
    "EngineConfig": "config",
    "build_engine": "factory",
    "SamplingParams": "sampling_params",
}

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "RequestOutput",
    "SamplingParams",
    "build_engine",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'loom.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"loom.engine.{home}"), name)
