"""The Llama family (SmolLM2, Llama 2/3, Mistral-style GQA) written for a paged KV cache.

Owns the forward pass over one flattened batch of tokens from many requests. Projections are
fused (q|k|v and gate|up) so one step issues few, large matmuls; attention is delegated to
`attention.paged_attention`. Never schedules or samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.attention import AttentionMetadata, paged_attention
from loom.models.config import ModelConfig


class RotaryEmbedding:
    """Precomputed cos/sin tables, indexed by absolute position (HF `rotate_half` layout)."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, dtype: torch.dtype) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.cos = torch.cat([freqs, freqs], dim=-1).cos().to(dtype)  # [max_positions, head_dim]
        # rotate_half(x) * sin == roll(x, half) * [-sin | sin]: one roll instead of slice, neg, cat
        self.signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(dtype)
        self.half = head_dim // 2

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)  # [T, 1, hd]

    def apply_(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
        """Rotates `x` (`[T, heads, hd]`, may be a view) in place."""
        rotated = x.roll(self.half, dims=-1)
        x.mul_(cos).addcmul_(rotated, signed_sin)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.input_norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.post_attn_norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.qkv_proj = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.intermediate_size = cfg.intermediate_size

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        x = F.rms_norm(hidden, (hidden.shape[-1],), self.input_norm, self.eps)
        qkv = self.qkv_proj(x).view(num_tokens, -1, self.head_dim)  # [T, heads + 2*kv_heads, hd]
        # q and k share one RoPE call: they are the leading heads of the fused projection
        rope.apply_(qkv[:, : self.num_heads + self.num_kv_heads], *cos_sin)
        q, kv_new = qkv[:, : self.num_heads], qkv[:, self.num_heads :]
        attn = paged_attention(q, kv_new, kv_cache, meta).reshape(num_tokens, -1)
        hidden = hidden + self.o_proj(attn)
        x = F.rms_norm(hidden, (hidden.shape[-1],), self.post_attn_norm, self.eps)
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,  # [R] which tokens' hidden states become logits
    ) -> torch.Tensor:  # [R, vocab] in float32
        hidden = self.embed_tokens(input_ids)
        cos_sin = self.rope.tables(positions)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, self.rope, cos_sin, kv, meta)
        hidden = hidden.index_select(0, logits_indices)
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.config.rms_norm_eps)
        return self.lm_head(hidden).float()

    def load_hf_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies HF-named tensors in, fusing q|k|v and gate|up."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
            self.norm.copy_(tensors["model.norm.weight"])
            head = tensors.get("lm_head.weight")
            if head is None or self.config.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
            else:
                self.lm_head.weight.copy_(head)
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.input_norm.copy_(tensors[p + "input_layernorm.weight"])
                layer.post_attn_norm.copy_(tensors[p + "post_attention_layernorm.weight"])
                attn = [tensors[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]
                layer.qkv_proj.weight.copy_(torch.cat(attn, dim=0))
                layer.o_proj.weight.copy_(tensors[p + "self_attn.o_proj.weight"])
                mlp = [tensors[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up")]
                layer.gate_up_proj.weight.copy_(torch.cat(mlp, dim=0))
                layer.down_proj.weight.copy_(tensors[p + "mlp.down_proj.weight"])
