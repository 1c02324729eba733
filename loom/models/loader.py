"""From a model path to a config and tensors: `load_weights`, and `load_sources` for model building.

Owns dispatch by format (GGUF file or Hugging Face folder) and the contract every format meets:
tensors named and shaped exactly as in Hugging Face's `LlamaForCausalLM` state dict, in the
requested dtype, on CPU. `load_sources` keeps a GGUF file's values as the file has them (float32,
or Q4_1 as 4-bit groups) for the linear methods to prepare. Never builds modules, moves tensors to
a device, or downloads anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.models.config import ModelConfig
from loom.models.gguf_blocks import Blocks
from loom.models.loader_gguf import load_gguf, read_gguf
from loom.models.loader_hf import load_hf_folder

_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True, slots=True)
class LoadedWeights:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # Hugging Face Llama naming, HF layout, CPU


def load_weights(
    path: str | Path,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
) -> LoadedWeights:
    """Loads a local GGUF file or HF folder; `progress(done, total)` is called once per tensor.

    Raises FileNotFoundError for a path that is not there and ValueError for anything Loom cannot
    load (format, architecture, quantization type, tensor set), each naming what is wrong.
    """
    model_path = _existing_model_path(path, dtype)
    if model_path.is_dir():
        config, tensors = load_hf_folder(model_path, dtype, progress)
    else:
        config, tensors = load_gguf(model_path, dtype, progress)
    check_llama_tensors(config, tensors)
    return LoadedWeights(config=config, tensors=tensors)


def load_sources(
    path: str | Path,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
    keep_blocks: bool = False,
) -> tuple[ModelConfig, dict[str, torch.Tensor | Blocks]]:
    """As `load_weights`, but a GGUF file's tensors stay float32 and, with `keep_blocks`, Q4_1 and Q8_0
    matrices stay as their blocks."""
    model_path = _existing_model_path(path, dtype)
    if model_path.is_dir():
        config, hf_tensors = load_hf_folder(model_path, dtype, progress)
        sources: dict[str, torch.Tensor | Blocks] = dict(hf_tensors)
    else:
        config, sources = read_gguf(model_path, progress, keep_blocks)
    check_llama_tensors(config, sources)
    return config, sources


def is_gguf_file(path: str | Path) -> bool:
    model_path = Path(path).expanduser()
    return model_path.is_file() and _is_gguf(model_path)


def _existing_model_path(path: str | Path, dtype: torch.dtype) -> Path:
    if not dtype.is_floating_point:
        raise ValueError(f"weights load as a floating-point dtype, not {dtype}")
    model_path = Path(path).expanduser()
    if model_path.is_file() and not _is_gguf(model_path):
        raise ValueError(f"{model_path} is not a GGUF file (expected a .gguf file or a HF folder)")
    if not model_path.exists():
        raise FileNotFoundError(f"model path {model_path} does not exist")
    return model_path


def llama_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama model with `config` needs, by HF name; no lm_head when tied."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_heads * config.head_dim
    kv_rows = config.num_kv_heads * config.head_dim
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = {f"model.layers.{i}.{name}": shape for i in range(config.num_layers) for name, shape in per_layer.items()}
    shapes["model.embed_tokens.weight"] = (config.vocab_size, hidden)
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def check_llama_tensors(config: ModelConfig, tensors: Mapping[str, torch.Tensor | Blocks]) -> None:
    """Raises ValueError unless `tensors` is exactly the set `llama_tensor_shapes` names."""
    expected = llama_tensor_shapes(config)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the config: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensors[name].shape)}, config implies {shape}")


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(_GGUF_MAGIC)) == _GGUF_MAGIC
