"""Builds a ready `AsyncEngine` from an `EngineConfig`: weights, tokenizer, KV cache, core."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

from loom.engine.async_engine import AsyncEngine
from loom.engine.config import EngineConfig
from loom.engine.core import EngineCore
from loom.engine.host_memory import keep_freed_memory
from loom.engine.kv_cache import KVCacheManager
from loom.engine.runner import ModelRunner
from loom.engine.scheduler import Scheduler, SchedulerConfig
from loom.models.registry import load_model
from loom.models.timing import keep_choices
from loom.tokenizer import load_tokenizer


def resolve_max_model_len(config: EngineConfig, model_limit: int) -> int:
    if config.max_model_len is None:
        return model_limit
    if config.max_model_len > model_limit:
        raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's context length {model_limit}")
    return config.max_model_len


def num_kv_blocks(config: EngineConfig, num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    elem = torch.empty((), dtype=config.torch_dtype).element_size()
    block_bytes = 2 * num_layers * config.block_size * num_kv_heads * head_dim * elem
    return int(config.kv_cache_gib * 2**30) // block_bytes


def build_engine(config: EngineConfig, progress: Callable[[int, int], None] | None = None) -> AsyncEngine:
    """Loads the tokenizer here and the model on the engine's own thread; returns a ready engine."""
    engine = begin_engine(config, progress)
    engine.wait_core()
    return engine


def begin_engine(
    config: EngineConfig,
    progress: Callable[[int, int], None] | None = None,
    quiet: threading.Event | None = None,
) -> AsyncEngine:
    """Loads the tokenizer here and starts building the model on the engine's own thread; the
    caller goes on with other work and calls `wait_core()` for a ready engine.

    `quiet`: the build waits for it before timing any kernel (`timing.measured`: on a machine whose
    choices are kept in the cache directory, none is timed), so that no timing is taken while the
    caller's thread is busy; the caller must set it.
    """
    tokenizer = load_tokenizer(config.model_path)

    def build_core() -> EngineCore:
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        keep_choices(config.weight_cache_dir, None if quiet is None else quiet.wait)
        model = load_model(
            config.model_path,
            config.torch_dtype,
            progress,
            config.quantization,
            config.weight_cache_dir,
            config.small_batch_rows,
        )
        cfg = model.config
        max_model_len = resolve_max_model_len(config, cfg.max_position_embeddings)
        num_blocks = num_kv_blocks(config, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        if num_blocks * config.block_size < max_model_len:
            raise ValueError(
                f"a KV cache of {config.kv_cache_gib} GiB holds {num_blocks * config.block_size} tokens, fewer than "
                f"one request of --max-model-len {max_model_len}: raise --kv-cache-gib or lower --max-model-len"
            )
        kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        sched_cfg = SchedulerConfig(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            max_model_len,
            config.scheduling_policy,
            config.chunk_attention_context,
        )
        keep_freed_memory()  # after loading: the loader's one-off buffers are unmapped as before
        runner = ModelRunner(model, num_blocks, config.block_size, config.torch_dtype)
        return EngineCore(Scheduler(sched_cfg, kv), runner, tokenizer.eos_token_id, config.grammar_fast_forward)

    engine = AsyncEngine(build_core, tokenizer)
    engine.begin_core()
    return engine
