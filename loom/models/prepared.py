"""Prepared weights: a Llama's tensors in the form its modules use, named by module path.

Owns the step from HF-named source tensors (float, or Q4_1 groups kept 4-bit) to `PreparedWeights`:
q|k|v and gate|up fused into one weight each, every linear prepared by its `LinearMethod`, norms
and the embedding in the model dtype. This is what the weight cache stores and what `LlamaModel`
is built from, so nothing is initialized, copied or swapped after loading. Never reads files.

Names: `embed_tokens`, `norm`, `layers.{i}.input_norm`, `layers.{i}.post_attn_norm`, and per linear
(`layers.{i}.qkv_proj|o_proj|gate_up_proj|down_proj`, `lm_head`) its method's tensors, e.g.
`layers.0.qkv_proj.qweight`. A tied head whose dense weight would equal the embedding stores none.
A dense head whose source is Q8_0 blocks also keeps them (`lm_head.q8_codes`, `lm_head.q8_scales`)
for its small-batch kernel (`linear.with_q8_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.models.config import ModelConfig
from loom.models.gguf_blocks import Q4Groups, Q8Blocks, as_float
from loom.models.linear import WeightSource, dense_dtype, head_quantization, linear_method

_FUSED = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
_NORMS = {"input_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm"}
LINEAR_NAMES = tuple(_FUSED)


@dataclass(frozen=True, slots=True)
class PreparedWeights:
    config: ModelConfig
    quantization: str  # every decoder linear's method: "none" | "int8" | "int4"
    head_quantization: str  # the output head's
    tensors: dict[str, torch.Tensor]

    def linear(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors of linear `name` (e.g. `layers.0.qkv_proj`), keyed by the method's own names."""
        prefix = name + "."
        return {key[len(prefix) :]: t for key, t in self.tensors.items() if key.startswith(prefix)}


def prepare_llama_weights(
    config: ModelConfig, sources: dict[str, WeightSource], quantization: str, dtype: torch.dtype
) -> PreparedWeights:
    """Consumes `sources` (HF names, as `check_llama_tensors` accepts them) into prepared tensors."""
    method, head = linear_method(quantization), linear_method(head_quantization(quantization))
    tensors: dict[str, torch.Tensor] = {}
    embed_source = sources.pop("model.embed_tokens.weight")
    embed = as_float(embed_source)
    tensors["embed_tokens"] = embed.to(dtype)
    tensors["norm"] = as_float(sources.pop("model.norm.weight")).to(dtype)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for name, hf_name in _NORMS.items():
            tensors[f"layers.{i}.{name}"] = as_float(sources.pop(p + hf_name + ".weight")).to(dtype)
        for name, parts in _FUSED.items():
            fused = _cat_rows([sources.pop(p + part + ".weight") for part in parts])
            for key, t in method.prepare(fused, dtype).items():
                tensors[f"layers.{i}.{name}.{key}"] = t
    head_source = sources.pop("lm_head.weight", None)
    tied = head_source is None or config.tie_word_embeddings
    if not (tied and head.name == "none" and dense_dtype(dtype) == dtype):
        for key, t in head.prepare(embed if tied or head_source is None else head_source, dtype).items():
            tensors[f"lm_head.{key}"] = t
    blocks = embed_source if tied or head_source is None else head_source
    if isinstance(blocks, Q8Blocks) and head.name == "none":
        tensors["lm_head.q8_codes"], tensors["lm_head.q8_scales"] = blocks.codes, blocks.scales
    return PreparedWeights(config, method.name, head.name, tensors)


def _cat_rows(parts: list[WeightSource]) -> WeightSource:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, Q4Groups) for p in parts):
        return Q4Groups.cat_rows([p for p in parts if isinstance(p, Q4Groups)])
    return torch.cat([as_float(p) for p in parts])
