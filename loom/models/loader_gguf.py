"""Reads a llama.cpp GGUF file into a `ModelConfig` and Hugging Face-named, HF-layout tensors.

Owns the GGUF side of loading: metadata → config, GGUF tensor names → HF names, dequantization
(whatever `gguf.quants` supports), and undoing llama.cpp's q/k row permutation. Never builds
modules, checks the final tensor set (`loader.py` does), or reads tokenizer data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # gguf costs ~0.15 s to import; a start from the weight cache never needs it
    from gguf import GGUFReader, ReaderTensor

from loom.models.config import ModelConfig
from loom.models.gguf_blocks import Blocks, as_float, float_values, q4_1_groups, q8_0_blocks

SUPPORTED_ARCHITECTURES = frozenset({"llama"})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


def load_gguf(
    path: Path, dtype: torch.dtype, progress: Callable[[int, int], None] | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dequantizes every tensor of a GGUF file to `dtype`, named and laid out as in HF Llama."""
    config, sources = read_gguf(path, progress, keep_blocks=False)
    return config, {name: as_float(source).to(dtype) for name, source in sources.items()}


def read_gguf(
    path: Path, progress: Callable[[int, int], None] | None = None, keep_blocks: bool = False
) -> tuple[ModelConfig, dict[str, torch.Tensor | Blocks]]:
    """Every tensor by HF name in HF layout: float32, or with `keep_blocks` Q4_1 and Q8_0 matrices as their blocks."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    config = read_gguf_config(reader)
    # Map every name before decoding anything, so an unsupported file fails in milliseconds.
    named = [(gguf_to_hf_name(t.name), t) for t in reader.tensors]
    sources: dict[str, torch.Tensor | Blocks] = {}
    for done, (hf_name, gguf_tensor) in enumerate(named, start=1):
        source = _decode(gguf_tensor, keep_blocks)
        if hf_name.endswith("self_attn.q_proj.weight"):
            source = _unpermute(source, config.num_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            source = _unpermute(source, config.num_kv_heads)
        sources[hf_name] = source
        if progress is not None:
            progress(done, len(named))
    return config, sources


def read_gguf_config(reader: GGUFReader) -> ModelConfig:
    """The architecture numbers from `{arch}.*` metadata; rejects what a plain Llama cannot run."""
    arch = _required(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; Loom loads {sorted(SUPPORTED_ARCHITECTURES)}")
    _reject_rope_scaling(reader, arch)
    hidden_size = int(_required(reader, f"{arch}.embedding_length"))
    num_heads = int(_required(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden_size // num_heads))
    rotary_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(f"partial rotary embeddings ({rotary_dim} of {head_dim}) are not supported")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        architecture=arch,
        vocab_size=_vocab_size(reader, arch),
        hidden_size=hidden_size,
        intermediate_size=int(_required(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_required(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        # Older files omit head_count_kv; llama.cpp then reads it as plain multi-head attention.
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_required(reader, f"{arch}.context_length")),
        tie_word_embeddings="output.weight" not in names,
    )


def gguf_to_hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unsupported GGUF tensor {name!r}: not part of a plain Llama model")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row permutation, back to the order HF's rotate_half RoPE expects.

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)...; HF rotates the two halves of each head.
    Its converter therefore reorders each head's rows from [halves, pairs] to [pairs, halves]:
    `w.reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)`. This is that, inverted.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    per_pair = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return per_pair.transpose(1, 2).reshape(weight.shape)


def _unpermute(source: torch.Tensor | Blocks, num_heads: int) -> torch.Tensor | Blocks:
    if isinstance(source, torch.Tensor):
        return unpermute_rope_rows(source, num_heads)
    return source.map_rows(lambda t: unpermute_rope_rows(t, num_heads))


def _decode(tensor: ReaderTensor, keep_blocks: bool) -> torch.Tensor | Blocks:
    """Float32 values (or Q4_1 / Q8_0 blocks) in torch order ([rows, cols]: GGUF lists dims innermost first)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    float_types = {
        GGMLQuantizationType.F32: torch.float32,
        GGMLQuantizationType.F16: torch.float16,
        GGMLQuantizationType.BF16: torch.bfloat16,
    }
    dims = tuple(int(n) for n in reversed(tensor.shape))
    kind = tensor.tensor_type
    if kind in float_types:
        return float_values(tensor.data, dims, float_types[kind])
    if kind == GGMLQuantizationType.Q4_1 and len(dims) == 2:
        groups = q4_1_groups(tensor.data, *dims)
        return groups if keep_blocks else groups.dequantize()
    if kind == GGMLQuantizationType.Q8_0 and len(dims) == 2:
        blocks = q8_0_blocks(tensor.data, *dims)
        return blocks if keep_blocks else blocks.dequantize()
    try:
        values = dequantize(tensor.data, kind)
    except NotImplementedError as exc:
        raise ValueError(f"GGUF tensor {tensor.name!r} is {kind.name}, which gguf cannot decode") from exc
    # F32 comes back as a read-only view of the memory-mapped file; torch needs owned memory.
    if not values.flags.writeable:
        values = values.copy()
    return torch.from_numpy(values).reshape(dims)


def _required(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"GGUF metadata lacks {key!r}")
    return field.contents()


def _field(reader: GGUFReader, key: str, default: Any) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _vocab_size(reader: GGUFReader, arch: str) -> int:
    explicit = reader.get_field(f"{arch}.vocab_size")
    if explicit is not None:
        return int(explicit.contents())
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    # `data` holds one index per array element: the count without decoding 50k strings.
    return len(tokens.data)


def _reject_rope_scaling(reader: GGUFReader, arch: str) -> None:
    # ModelConfig has no rope-scaling fields, so a scaled model would run with wrong positions.
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        kind = scaling if scaling != "none" else "llama3 (rope_freqs)"
        raise ValueError(f"RoPE scaling {kind!r} is not supported yet")
