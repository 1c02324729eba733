"""Loom's inference engine: continuous batching over a paged KV cache, batched sampling.

Public surface: `AsyncEngine`, `SamplingParams`, `RequestOutput`, `EngineConfig`, `build_engine`.
Never imports HTTP, JSON schemas or money.
"""

from loom.engine.async_engine import AsyncEngine, EngineError, EngineStats, RequestOutput
from loom.engine.config import EngineConfig
from loom.engine.factory import build_engine
from loom.engine.sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "RequestOutput",
    "SamplingParams",
    "build_engine",
]
