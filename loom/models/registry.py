"""Model architectures by name, and the one call that turns a path into a ready model: `load_model`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from loom.models.config import ModelConfig
from loom.models.gguf_blocks import Q4Groups
from loom.models.linear import check_quantization, resolve_quantization
from loom.models.llama import LlamaModel
from loom.models.loader import is_gguf_file, load_sources
from loom.models.prepared import PreparedWeights, prepare_llama_weights
from loom.models.weight_cache import cache_key, load_cached, save_cached

_ARCHITECTURES: dict[str, Callable[[ModelConfig, torch.dtype, PreparedWeights, int], LlamaModel]] = {
    "llama": LlamaModel
}

log = logging.getLogger(__name__)


def load_model(
    path: str | Path,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
    quantization: str = "none",
    cache_dir: Path | None = None,
    max_small_batch_rows: int | None = None,
) -> LlamaModel:
    """Loads and builds a model; `quantization` is none | int8 | int4 | auto (see `linear.resolve_quantization`).

    With `cache_dir`, a GGUF file's prepared weights are read from there when fresh and written
    there otherwise (see weight_cache.py); without it nothing touches the disk but the model file.
    """
    weights = load_prepared(path, dtype, progress, quantization, cache_dir)
    build = _ARCHITECTURES.get(weights.config.architecture)
    if build is None:
        raise ValueError(f"unsupported architecture {weights.config.architecture!r}; known: {sorted(_ARCHITECTURES)}")
    return build(weights.config, dtype, weights, max_small_batch_rows).eval()


def load_prepared(
    path: str | Path,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
    quantization: str = "none",
    cache_dir: Path | None = None,
) -> PreparedWeights:
    check_quantization(quantization)  # an unknown name fails before any loading
    key = cache_key(Path(path), dtype, quantization) if cache_dir is not None and is_gguf_file(path) else None
    if cache_dir is not None and key is not None:
        cached = load_cached(cache_dir, key)
        if cached is not None:
            if progress is not None:
                progress(len(cached.tensors), len(cached.tensors))
            return cached
    config, sources = load_sources(path, dtype, progress, keep_blocks=quantization in ("auto", "int4"))
    weights_are_q4 = all(isinstance(t, Q4Groups) for name, t in sources.items() if name.endswith("_proj.weight"))
    resolved = resolve_quantization(quantization, dtype, weights_are_q4)
    weights = prepare_llama_weights(config, sources, resolved, dtype)
    if cache_dir is not None and key is not None:
        saved = save_cached(cache_dir, key, weights)
        if saved is not None:
            log.info("cached prepared weights (%s) in %s", resolved, saved)
    return weights
