"""Model architectures by name, and the one call that turns a path into a ready model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from loom.models.config import ModelConfig
from loom.models.llama import LlamaModel
from loom.models.loader import load_weights
from loom.models.packed_linear import can_pack, pack_linears

_ARCHITECTURES: dict[str, Callable[[ModelConfig, torch.dtype], LlamaModel]] = {"llama": LlamaModel}


def load_model(
    path: str | Path, dtype: torch.dtype, progress: Callable[[int, int], None] | None = None
) -> LlamaModel:
    weights = load_weights(path, dtype, progress)
    build = _ARCHITECTURES.get(weights.config.architecture)
    if build is None:
        raise ValueError(f"unsupported architecture {weights.config.architecture!r}; known: {sorted(_ARCHITECTURES)}")
    with torch.device("cpu"):
        model = build(weights.config, dtype).to(dtype)
    model.load_hf_tensors(weights.tensors)
    if can_pack(dtype, torch.device("cpu")):
        pack_linears(model)
    return model.eval()
