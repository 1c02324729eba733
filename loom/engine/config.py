"""`EngineConfig`: what the CLI decides about one served model, frozen before the engine starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported only where a dtype is needed: the CLI builds its parser from this module
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str
    served_model_name: str
    dtype: str = "bfloat16"
    max_model_len: int | None = None  # None = the model's own context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    chunk_attention_context: int = 1024  # beside other requests, a prefill chunk's (query, key) pairs <= budget x this
    block_size: int = 16
    kv_cache_gib: float = 1.0
    num_threads: int | None = None  # None = every core
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority" (lower `priority` value served first)
    enable_prefix_caching: bool = True  # share full KV blocks across requests by content hash
    quantization: str = "none"  # linear layers: "none" | "int8" | "int4" | "auto" (loom.models.linear)
    # most decode rows of a step for the small-batch kernels (loom.models.linear); None: timed at build
    small_batch_rows: int | None = None
    weight_cache_dir: Path | None = None  # prepared weights read from / written to here (loom.models.weight_cache)
    grammar_fast_forward: bool = True  # append the tokens a grammar forces without sampling each one

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        return getattr(torch, self.dtype)
