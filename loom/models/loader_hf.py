"""Reads a local Hugging Face folder (config.json + safetensors) into a `ModelConfig` and tensors.

Owns the HF side of loading: config.json → config (rejecting architectures and options a plain
Llama cannot honor), finding single or sharded safetensors files, casting to the requested dtype.
Never downloads, reads pickled `.bin` checkpoints, or checks the final tensor set (loader.py does).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from loom.models.config import ModelConfig

# Mistral is Llama plus an optional sliding window; it is accepted only without one (checked below).
_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama"}
_SHARD_INDEX = "model.safetensors.index.json"


def load_hf_folder(
    folder: Path, dtype: torch.dtype, progress: Callable[[int, int], None] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Reads config.json and every safetensors tensor the model uses, cast to `dtype`."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: no config.json")
    config = read_hf_config(json.loads(config_path.read_text()))
    files = safetensors_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        # safe_open handles are not iterable: .keys() is their only listing.
        wanted = [(h, n) for h in handles for n in h.keys() if _is_model_weight(n, config)]
        for done, (handle, name) in enumerate(wanted, start=1):
            tensors[name] = handle.get_tensor(name).to(dtype)
            if progress is not None:
                progress(done, len(wanted))
    return config, tensors


def read_hf_config(raw: dict[str, Any]) -> ModelConfig:
    """The architecture numbers from a parsed config.json; defaults follow `LlamaConfig`'s."""
    architecture = _architecture(raw)
    _reject_unsupported_options(raw)
    hidden_size = _required(raw, "hidden_size")
    num_heads = _required(raw, "num_attention_heads")
    return ModelConfig(
        architecture=architecture,
        vocab_size=_required(raw, "vocab_size"),
        hidden_size=hidden_size,
        intermediate_size=_required(raw, "intermediate_size"),
        num_layers=_required(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
        rope_theta=_rope_theta(raw),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those named by a shard index if there is one, else every *.safetensors."""
    index_path = folder / _SHARD_INDEX
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{_SHARD_INDEX} in {folder} names missing shards: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt*")):
        raise ValueError(
            f"{folder} holds only pickled PyTorch weights; Loom reads safetensors "
            "(convert with `model.save_pretrained(dir, safe_serialization=True)`)"
        )
    raise FileNotFoundError(f"no *.safetensors weights in {folder}")


def _architecture(raw: dict[str, Any]) -> str:
    names = raw.get("architectures") or []
    if names:
        if names[0] in _ARCHITECTURES:
            return _ARCHITECTURES[names[0]]
        unsupported = names[0]
    else:
        model_type = raw.get("model_type")
        if model_type in _MODEL_TYPES:
            return _MODEL_TYPES[model_type]
        unsupported = model_type
    raise ValueError(
        f"unsupported architecture {unsupported!r}; Loom loads {sorted(_ARCHITECTURES)} "
        "(Mistral without a sliding window)"
    )


def _reject_unsupported_options(raw: dict[str, Any]) -> None:
    """Options that change the maths; silently ignoring any of them would give wrong outputs."""
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError("attention or MLP biases are not supported yet")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"activation {raw['hidden_act']!r} is not supported; Loom runs SiLU")
    window = raw.get("sliding_window")
    if window is not None and window < raw.get("max_position_embeddings", 2048):
        raise ValueError(f"sliding-window attention ({window} tokens) is not supported yet")


def _rope_theta(raw: dict[str, Any]) -> float:
    # transformers 5 writes `rope_parameters`; older configs use `rope_theta` + `rope_scaling`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported yet")
    return float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))


def _required(raw: dict[str, Any], key: str) -> int:
    if key not in raw:
        raise ValueError(f"config.json lacks {key!r}")
    return int(raw[key])


def _is_model_weight(name: str, config: ModelConfig) -> bool:
    # Old checkpoints saved RoPE's inverse frequencies; tied checkpoints may still store lm_head.
    if name.endswith("rotary_emb.inv_freq"):
        return False
    return not (config.tie_word_embeddings and name == "lm_head.weight")
