"""The Llama family (SmolLM2, Llama 2/3, Mistral-style GQA) written for a paged KV cache.

Owns the forward pass over one flattened batch of tokens from many requests. Projections are
fused (q|k|v and gate|up) so one step issues few, large matmuls; attention is delegated to
`attention.paged_attention`. A model is built either from `PreparedWeights` (each linear the
module its `LinearMethod` builds; nothing initialized, copied or swapped after loading) or, for
tests, randomly initialized with plain `nn.Linear`s. Never schedules or samples.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.attention import (
    AttentionMetadata,
    DecodeBlocks,
    native_wins_prefill,
    paged_attention,
    sdpa_wins_decode,
    sdpa_wins_prefill,
)
from loom.models.config import ModelConfig
from loom.models.linear import (
    Int4Linear,
    RowSwitchLinear,
    apply_linear,
    dense_module,
    linear_method,
    measure_small_batch_rows,
    use_float32_copies,
    with_q8_blocks,
)
from loom.models.native import (
    INT4_MAX_ROWS,
    LAYER_FIELDS,
    choose_int4_kernel,
    decode_layers,
    native_layer_ops_supported,
    rms_norm,
    rope_and_write,
    silu_mul,
)
from loom.models.prepared import LINEAR_NAMES, PreparedWeights


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


class _RandomInit:
    """Plain `nn.Linear`s with PyTorch's default init and norms of ones (random test models)."""

    def linear(self, name: str, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def vector(self, name: str, size: int) -> nn.Parameter:
        return nn.Parameter(torch.ones(size), requires_grad=False)


class _FromPrepared:
    """Modules over prepared tensors, each decoder linear built by its method, all built up front.

    Building is mostly oneDNN reordering (a copy of every dense weight, ~1 s for SmolLM2's float32
    copies on a busy 2-core machine): the reorders release the GIL, so one worker per torch thread
    halves it.
    """

    def __init__(self, weights: PreparedWeights, dtype: torch.dtype) -> None:
        self.weights, self.dtype = weights, dtype
        bf16_bytes = sum(t.numel() * t.element_size() for t in weights.tensors.values() if t.dtype == torch.bfloat16)
        self.float32_copy = use_float32_copies(bf16_bytes)
        method = linear_method(weights.quantization)
        names = [f"layers.{i}.{n}" for i in range(weights.config.num_layers) for n in LINEAR_NAMES]
        with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            built = pool.map(lambda name: method.build(weights.linear(name), dtype, self.float32_copy), names)
            self.linears = dict(zip(names, built, strict=True))

    def linear(self, name: str, in_features: int, out_features: int) -> nn.Module:
        return self.linears[name]

    def vector(self, name: str, size: int) -> nn.Parameter:
        return nn.Parameter(self.weights.tensors[name], requires_grad=False)


_Init = _RandomInit | _FromPrepared


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, init: _Init | None = None, prefix: str = "") -> None:
        super().__init__()
        init = init or _RandomInit()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.input_norm = init.vector(prefix + "input_norm", cfg.hidden_size)
        self.post_attn_norm = init.vector(prefix + "post_attn_norm", cfg.hidden_size)
        self.qkv_proj = init.linear(prefix + "qkv_proj", cfg.hidden_size, q_size + 2 * kv_size)
        self.o_proj = init.linear(prefix + "o_proj", q_size, cfg.hidden_size)
        self.gate_up_proj = init.linear(prefix + "gate_up_proj", cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = init.linear(prefix + "down_proj", cfg.intermediate_size, cfg.hidden_size)
        self.intermediate_size = cfg.intermediate_size
        # the step's modules and norms as one plain attribute: each is otherwise found through
        # nn.Module.__getattr__ (~0.7 us, six times a layer, 30 layers a decode step)
        self._parts = (
            self.qkv_proj,
            self.o_proj,
            self.gate_up_proj,
            self.down_proj,
            self.input_norm,
            self.post_attn_norm,
        )

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        rope: RotaryEmbedding,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        num_small_rows: int = 0,  # leading rows that may take the small-batch kernels (see linear.py)
        native: bool = False,  # the norms, RoPE and the cache write in native kernels (native.py)
    ) -> torch.Tensor:
        num_tokens, nq = hidden.shape[0], num_small_rows
        qkv_proj, o_proj, gate_up_proj, down_proj, input_norm, post_attn_norm = self._parts
        x = self._norm(hidden, input_norm, native)
        qkv = apply_linear(qkv_proj, x, nq).view(num_tokens, -1, self.head_dim)  # [T, heads + 2*kv_heads, hd]
        q, kv_new = qkv[:, : self.num_heads], qkv[:, self.num_heads :]
        if native:  # this step's K and V are in the cache afterwards
            rope_and_write(qkv, *cos_sin, self.num_heads, kv_cache, meta.slot_mapping)
            attn = paged_attention(q, None, kv_cache, meta)
        else:  # q and k share one RoPE call: they are the leading heads of the fused projection
            rope.apply_(qkv[:, : self.num_heads + self.num_kv_heads], *cos_sin)
            attn = paged_attention(q, kv_new, kv_cache, meta)
        hidden = hidden + apply_linear(o_proj, attn.reshape(num_tokens, -1), nq)
        x = self._norm(hidden, post_attn_norm, native)
        gate_up = apply_linear(gate_up_proj, x, nq)
        if native:
            return hidden + apply_linear(down_proj, silu_mul(gate_up), nq)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return hidden + apply_linear(down_proj, F.silu(gate) * up, nq)

    def _norm(self, hidden: torch.Tensor, weight: torch.Tensor, native: bool) -> torch.Tensor:
        return (
            rms_norm(hidden, weight, self.eps) if native else F.rms_norm(hidden, (hidden.shape[-1],), weight, self.eps)
        )


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        weights: PreparedWeights | None = None,
        max_small_batch_rows: int | None = None,
    ) -> None:
        """Built from `weights` in `dtype`; without them, randomly initialized float32 parameters (tests).

        `max_small_batch_rows`: a step's decode rows take the small-batch kernels (a quantized
        method's own, or bf16 beside a float32 copy) when there are at most this many of them
        (linear.py; None: measured on this model's linears now, the output head's apart); prefill
        rows always take the large-batch kernels.
        """
        super().__init__()
        self.config = cfg
        init: _Init = _RandomInit() if weights is None else _FromPrepared(weights, dtype)
        if weights is None:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        else:
            self.embed_tokens = nn.Embedding.from_pretrained(weights.tensors["embed_tokens"], freeze=True)
        self.layers = nn.ModuleList(DecoderLayer(cfg, init, f"layers.{i}.") for i in range(cfg.num_layers))
        self.norm = init.vector("norm", cfg.hidden_size)
        self.lm_head = self._head(cfg, weights, dtype, isinstance(init, _FromPrepared) and init.float32_copy)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, dtype)
        self.max_small_batch_rows = self.max_small_batch_head_rows = max_small_batch_rows or 0
        choose_int4_kernel()  # before the timings below: it sets how the int4 linears multiply
        if max_small_batch_rows is None:  # the head apart: its kernels and crossover differ from the layers'
            switches = [m for m in self.layers.modules() if isinstance(m, RowSwitchLinear)]
            self.max_small_batch_rows = measure_small_batch_rows(switches, dtype) if switches else 0
            head_switch = [self.lm_head] if isinstance(self.lm_head, RowSwitchLinear) else []
            self.max_small_batch_head_rows = measure_small_batch_rows(head_switch, dtype) if head_switch else 0
        for probe in (sdpa_wins_decode, sdpa_wins_prefill, native_wins_prefill):  # timed now, not in the step loop
            probe(dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        self.native_ops = native_layer_ops_supported(self.norm.dtype, self.norm.device, cfg.head_dim)
        self._layer_table = self._fused_layer_table() if self.native_ops else None
        self._table_caches: tuple[int, ...] = ()  # the KV caches whose addresses the table holds

    def _fused_layer_table(self) -> torch.Tensor | None:
        """Each layer's norms, int4 tiles and (filled per call) KV cache, as `decode_layers` reads
        them; None unless every decoder linear has an int4 small-batch kernel with tiles."""
        rows = []
        for layer in self.layers:
            row = [layer.input_norm.data_ptr(), layer.post_attn_norm.data_ptr()]
            for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                small = lin.small if isinstance(lin, RowSwitchLinear) else None
                if not isinstance(small, Int4Linear) or small.tiles is None:
                    return None
                row += [t.data_ptr() for t in small.tiles]
            rows.append(row + [0])
        assert len(rows[0]) == LAYER_FIELDS
        return torch.tensor(rows, dtype=torch.int64)

    def _fused_decode(
        self,
        hidden: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor | None:
        """The step's decode rows through every layer in one native call (`native.decode_layers`)
        when they are few enough for the small-batch kernels, and its prefill rows (if any) layer by
        layer; None where the fused call does not apply. Decode rows take the fused call whether or
        not a prefill shares their step, so a request's tokens do not depend on that."""
        table, ctx, nd = self._layer_table, meta.decode, meta.num_decode_tokens
        if table is None or not isinstance(ctx, DecodeBlocks) or nd > min(self.max_small_batch_rows, INT4_MAX_ROWS):
            return None
        caches = tuple(kv.data_ptr() for kv in kv_caches)
        if caches != self._table_caches:
            table[:, LAYER_FIELDS - 1] = torch.tensor(caches, dtype=torch.int64)
            self._table_caches = caches
        cfg, (cos, sin) = self.config, cos_sin
        decoded = hidden[:nd].contiguous()
        decode_layers(
            decoded, table, (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size, cfg.rms_norm_eps),
            cos[:nd], sin[:nd], meta.slot_mapping[:nd], kv_caches[0].shape[1], ctx.block_table, ctx.context_lens,
            meta.block_size,
        )  # fmt: skip
        if not meta.prefill_spans:
            return decoded
        spans = tuple(
            dataclasses.replace(span, start=span.start - nd, end=span.end - nd) for span in meta.prefill_spans
        )
        prefill_meta = AttentionMetadata(meta.slot_mapping[nd:], meta.block_size, 0, None, spans)
        rest, rest_cos_sin = hidden[nd:], (cos[nd:], sin[nd:])
        num_small = self._num_small_rows(meta) - nd
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            rest = layer(rest, self.rope, rest_cos_sin, kv, prefill_meta, num_small, self.native_ops)
        return torch.cat([decoded, rest])

    def _num_small_rows(self, meta: AttentionMetadata) -> int:
        """The step's leading rows that take the small-batch kernels: its decode rows when they are at
        most `max_small_batch_rows`, and the output chunks after them when those fit too (prompt
        rows never do, so a prompt's KV does not rest on the step it was computed in)."""
        nd, most = meta.num_decode_tokens, self.max_small_batch_rows
        if nd + meta.num_output_chunk_tokens <= most:
            return nd + meta.num_output_chunk_tokens
        return nd if nd <= most else 0

    def _head(
        self, cfg: ModelConfig, weights: PreparedWeights | None, dtype: torch.dtype, float32_copy: bool
    ) -> nn.Module:
        if weights is None:
            return nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        tensors = weights.linear("lm_head")
        q8 = {key: tensors.pop(key) for key in ("q8_codes", "q8_scales") if key in tensors}
        if not tensors:  # tied, and the dense head would equal the embedding: share it
            head = dense_module(self.embed_tokens.weight, float32_copy)
        else:
            head = linear_method(weights.head_quantization).build(tensors, dtype, float32_copy)
        return with_q8_blocks(head, q8, dtype)

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
        nq = self._num_small_rows(meta)
        fused = self._fused_decode(hidden, cos_sin, kv_caches, meta)
        if fused is not None:
            hidden = fused
        else:
            for layer, kv in zip(self.layers, kv_caches, strict=True):
                hidden = layer(hidden, self.rope, cos_sin, kv, meta, nq, self.native_ops)
        hidden = hidden.index_select(0, logits_indices)
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm, self.config.rms_norm_eps)
        # the runner lists decode tokens' logits rows first, so they are the leading rows here too
        num_decode = meta.num_decode_tokens
        head_nq = int((logits_indices < num_decode).sum()) if num_decode <= self.max_small_batch_head_rows else 0
        return apply_linear(self.lm_head, hidden, head_nq).float()
