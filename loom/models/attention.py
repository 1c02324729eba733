"""Attention over a paged KV cache for a flattened batch of decode and prefill tokens.

Owns the per-step `AttentionMetadata` and the attention math. Never decides which requests run
(the scheduler does) or where blocks live (the KV cache manager does); it only reads slot numbers.

Token layout of one step (the runner builds it):

    | decode tokens: one per request | prefill chunk of req A | prefill chunk of req B | ...
      num_decode_tokens                 prefill_spans[0]         prefill_spans[1]

KV cache per layer: one tensor `[2 * num_kv_heads, num_slots, head_dim]`, K heads then V heads,
slot = block_id * block_size + offset. K and V in one tensor mean one write and one gather per
layer; heads outermost mean a gathered context is already in the `[heads, reqs, tokens, head_dim]`
layout the batched matmuls read, so nothing is copied a second time.
"""

from __future__ import annotations

import functools
import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.models.native import native_prefill_supported, paged_decode, prefill_attention
from loom.models.packed_linear import float32_wins_large_batches
from loom.models.timing import best_times, measured


def zeroed_kv_cache(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """One layer's cache, all zeros; on CPU in anonymous memory the kernel zeroes page by page on first touch.

    `torch.zeros` writes every byte up front (~0.7 s per GiB on a busy 2-core machine, most of
    start-up once the weights are cached); an anonymous mapping costs microseconds and takes
    memory only as blocks fill. Zeros, not garbage: a padded key is masked to -inf, but 0 * NaN
    in the value matmul would still poison a row.
    """
    if device is not None and device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if num_bytes == 0:
        return torch.zeros(shape, dtype=dtype)
    # the tensor keeps the mapping alive; page-aligned, so vector loads are as aligned as torch's own
    return torch.frombuffer(mmap.mmap(-1, num_bytes), dtype=torch.uint8).view(dtype).view(shape)


@dataclass(frozen=True, slots=True)
class PrefillSpan:
    start: int  # first token of this chunk in the flattened batch
    end: int  # one past its last token
    context_slots: torch.Tensor  # [context_len] slots of every cached token up to this chunk's end
    is_first_chunk: bool  # no earlier tokens: plain causal attention


@dataclass(frozen=True, slots=True)
class DecodeBlocks:
    """Each decode request's context as the native kernel reads it (`native_decode_supported`)."""

    block_table: torch.Tensor  # [num_decodes, max_blocks] int32, padded with block 0
    context_lens: torch.Tensor  # [num_decodes] int32


@dataclass(frozen=True, slots=True)
class DecodeGather:
    """Each decode request's context as the torch path reads it: cache rows to gather and a mask."""

    gather: torch.Tensor  # [2*kv_heads * num_decodes * max_blocks] rows of the cache's block view
    mask: torch.Tensor  # [num_decodes, 1, max_context] additive: 0 valid, -inf padding


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    block_size: int
    num_decode_tokens: int
    decode: DecodeBlocks | DecodeGather | None  # None without decode tokens
    prefill_spans: tuple[PrefillSpan, ...]
    # the leading prefill tokens that are output, not prompt: tokens a grammar forced after a
    # sampled one (the runner lists those chunks first); they may take the small-batch kernels
    num_output_chunk_tokens: int = 0


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_new: torch.Tensor | None,  # [num_tokens, 2 * num_kv_heads, head_dim] this step's K|V; None: already written
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    if kv_new is not None:
        kv_cache.index_copy_(1, meta.slot_mapping, kv_new.transpose(0, 1))
    nd = meta.num_decode_tokens
    if not meta.prefill_spans:
        return _decode_attention(q, kv_cache, meta)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode_attention(q[:nd], kv_cache, meta)
    for span in meta.prefill_spans:
        out[span.start : span.end] = _prefill_attention(q[span.start : span.end], kv_cache, span)
    return out


# Up to this many decode requests, bf16/fp16 decode attention may run in SDPA's CPU kernel (it
# accumulates in float32), where `sdpa_wins_decode` measures it faster; else in the batched matmuls
# below. Which wins depends on the CPU. Whole SmolLM2 decode forward, int4 linears, bf16, 2 threads,
# the two alternated in one process: on an Intel AVX-512-bf16 guest SDPA won, 18.9 -> 14.7 ms at 1
# request, 27.2 -> 23.6 at 4, 72.5 -> 71.9 at 16, and lost at 32 (119 -> 126); on an AMD EPYC guest
# (whole engine step, ~200-token contexts) it lost everywhere: 9.6 vs 11.1 ms at 1, 13.2 vs 22.3 at
# 4, 31.6 vs 70.9 at 16, 44.8 vs 125 at 32. In float32 the matmuls win at every size (Intel
# micro-benchmark: 35 vs 40 us a layer at 1 request, 394 vs 678 us at 32).
SDPA_DECODE_MAX_REQUESTS = 16


@functools.cache
def sdpa_wins_decode(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether SDPA beats the batched matmuls for 4 decode queries over 256-token contexts, measured.

    Timed once per machine and head shape (`timing.measured`), interleaved, best of 5 (~10 ms),
    with the engine's threads; the model asks at build time so the step loop finds the answer cached."""
    if dtype == torch.float32:
        return False
    question = f"SDPA beats matmuls for decode attention, {dtype}, {num_heads}/{num_kv_heads} heads of {head_dim}"
    return measured(question, lambda: _time_decode_kernels(dtype, num_heads, num_kv_heads, head_dim))


def _time_decode_kernels(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    num_reqs, context = 4, 256
    q = torch.randn(num_reqs, num_heads, head_dim, generator=gen).to(dtype)
    kv = torch.randn(2 * num_kv_heads, num_reqs, context, head_dim, generator=gen).to(dtype)
    k, v = kv[:num_kv_heads], kv[num_kv_heads:]
    mask = torch.zeros(num_reqs, 1, context, dtype=dtype)
    sdpa, matmuls = best_times([lambda: _decode_sdpa(q, k, v, mask), lambda: _decode_matmuls(q, k, v, mask)], 5)
    return sdpa < matmuls


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """One query per request: the native kernel where the runner built its block table, else the
    torch path: SDPA for few bf16/fp16 requests where it wins here, else batched matmuls."""
    ctx = meta.decode
    if isinstance(ctx, DecodeBlocks):
        return paged_decode(q, kv_cache, ctx.block_table, ctx.context_lens, meta.block_size)
    assert ctx is not None
    num_reqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[0] // 2
    # whole blocks of every head in one dim-0 gather: few, large, contiguous copies
    blocks = kv_cache.view(-1, meta.block_size * head_dim).index_select(0, ctx.gather)
    kv = blocks.view(kv_cache.shape[0], num_reqs, -1, head_dim)  # [2*kv, D, L, hd]
    k, v = kv[:num_kv_heads], kv[num_kv_heads:]
    if num_reqs <= SDPA_DECODE_MAX_REQUESTS and sdpa_wins_decode(q.dtype, num_heads, num_kv_heads, head_dim):
        return _decode_sdpa(q, k, v, ctx.mask)
    return _decode_matmuls(q, k, v, ctx.mask)


def _decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`q` `[D, heads, hd]`, `k`/`v` `[kv_heads, D, L, hd]`, `mask` `[D, 1, L]` additive."""
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask.unsqueeze(1), enable_gqa=True
    )
    return out.squeeze(2)


def _decode_matmuls(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Same contract as `_decode_sdpa`: batched matmuls grouped by KV head."""
    num_reqs, num_heads, head_dim = q.shape
    qg = q.view(num_reqs, k.shape[0], -1, head_dim).transpose(0, 1)  # [kv, D, group, hd]
    scores = torch.matmul(qg, k.transpose(2, 3)).mul_(head_dim**-0.5).add_(mask)  # [kv, D, group, L]
    out = torch.matmul(scores.softmax(dim=-1), v)  # [kv, D, group, hd]
    return out.transpose(0, 1).reshape(num_reqs, num_heads, head_dim)


# bf16/fp16 prefill pads its queries and context to a multiple of this many rows. PyTorch's CPU
# flash attention JIT-compiles a brgemm kernel per shape and keeps each one in a cache that never
# evicts (about 240 KB per distinct length on an AMX CPU), so unpadded, every new prompt length a
# server sees stays in its memory; padded, a few dozen shapes cover every length.
PREFILL_PAD = 64
# A short chunk (grammar fast-forward appends a few forced tokens) pads its queries only this far:
# 64 rows for a 3-token chunk made constrained 32-stream steps ~40% slower (44.7 vs 32.0 ms).
SHORT_CHUNK_PAD = 16
# A bf16 prefill chunk of at least this many queries attends in float32 where float32 GEMMs beat
# bf16 ones (`float32_wins_large_batches`): SmolLM2's whole 512-token first-chunk forward 627 ->
# 579 ms on an Intel AVX-512-bf16 guest without AMX, 160 tokens 203 -> 199 ms.
PREFILL_FLOAT32_MIN_QUERIES = 64


# A bf16/fp16 prefill chunk attends with batched matmuls (scores in the model's dtype, as decode's)
# where `sdpa_wins_prefill` measures them faster and its scores take at most this many elements
# (32 MiB in bf16; beyond, SDPA's kernel never holds the whole score matrix). 32 requests of ~160
# prompt tokens arriving at once, SmolLM2 bf16, 2-core AMD EPYC guest: the 16th first token came
# 1.17-1.32 s after arrival instead of 1.33-1.43 s; KL to float32 attention 2.2e-3 either way.
PREFILL_MATMUL_MAX_SCORES = 16 * 2**20


@functools.cache
def sdpa_wins_prefill(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether SDPA (as `_prefill_attention` runs it) beats the batched matmuls for a 192-token first chunk.

    Timed once per machine and head shape (~20 ms), at build time like `sdpa_wins_decode`."""
    if dtype == torch.float32:
        return True
    question = f"SDPA beats matmuls for prefill attention, {dtype}, {num_heads}/{num_kv_heads} heads of {head_dim}"
    return measured(question, lambda: _time_prefill_kernels(dtype, num_heads, num_kv_heads, head_dim))


def _time_prefill_kernels(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    num_q = 192
    q = torch.randn(num_q, num_heads, head_dim, generator=gen).to(dtype)
    kv_cache = torch.randn(2 * num_kv_heads, num_q, head_dim, generator=gen).to(dtype)
    span = PrefillSpan(0, num_q, torch.arange(num_q), is_first_chunk=True)
    sdpa, matmuls = best_times(
        [lambda: _prefill_sdpa(q, kv_cache, span), lambda: _prefill_matmuls(q, kv_cache, span)], 5
    )
    return sdpa < matmuls


@functools.cache
def native_wins_prefill(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the native kernel (csrc/prefill_attention.c) beats both torch kernels for a 192-token
    first chunk and for 512 queries over 1,024 keys, where it runs at all; measured like
    `sdpa_wins_prefill` (~0.2 s, once per machine).

    2-core AMD EPYC (Zen 4) guest, SmolLM2's heads, one layer (load ~0.6), the kernel with 16-key
    blocks: a 160-token first chunk 0.27 ms against SDPA's 0.72, 100 queries over 160 keys 0.23
    against 0.64, 512 over 1024 7.1 against 9.6; 32-key blocks took 1.16-1.32x less again. With AMX,
    SDPA's bf16 tiles may win; there the timing decides."""
    if not native_prefill_supported(dtype, torch.device("cpu"), num_heads, num_kv_heads, head_dim):
        return False
    shape = f"{dtype}, {num_heads}/{num_kv_heads} heads of {head_dim}"
    question = f"native kernel beats torch for prefill attention at 192 and 512/1024, {shape}"
    return measured(question, lambda: _time_native_prefill(dtype, num_heads, num_kv_heads, head_dim))


def _time_native_prefill(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """A short first chunk and a long continued one: the native kernel must win both (AMX's SDPA
    may lose the first and win the second)."""
    gen = torch.Generator().manual_seed(0)
    for num_q, num_ctx in ((192, 192), (512, 1024)):
        q = torch.randn(num_q, num_heads, head_dim, generator=gen).to(dtype)
        kv_cache = torch.randn(2 * num_kv_heads, num_ctx, head_dim, generator=gen).to(dtype)
        if not _native_wins(q, kv_cache, PrefillSpan(0, num_q, torch.arange(num_ctx), num_q == num_ctx)):
            return False
    return True


def _native_wins(q: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan) -> bool:
    native, sdpa, matmuls = best_times(
        [
            lambda: prefill_attention(q, kv_cache, span.context_slots),
            lambda: _prefill_sdpa(q, kv_cache, span),
            lambda: _prefill_matmuls(q, kv_cache, span),
        ],
        3,
    )
    return native < min(sdpa, matmuls)


def _prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    num_heads, num_kv_heads, head_dim = q.shape[1], kv_cache.shape[0] // 2, q.shape[2]
    if q.device.type == "cpu" and native_wins_prefill(q.dtype, num_heads, num_kv_heads, head_dim):
        return prefill_attention(q, kv_cache, span.context_slots)
    scores = num_heads * q.shape[0] * span.context_slots.shape[0]
    if scores <= PREFILL_MATMUL_MAX_SCORES and not sdpa_wins_prefill(q.dtype, num_heads, num_kv_heads, head_dim):
        return _prefill_matmuls(q, kv_cache, span)
    return _prefill_sdpa(q, kv_cache, span)


def _prefill_matmuls(q: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    """Causal attention of a chunk's queries `[Q, heads, hd]`, the last Q positions of its context."""
    num_q, num_heads, head_dim = q.shape
    num_kv_heads, num_ctx = kv_cache.shape[0] // 2, span.context_slots.shape[0]
    group = num_heads // num_kv_heads
    kv = kv_cache.index_select(1, span.context_slots)  # [2*kv, C, hd]
    # rows of one KV head's scores: its query heads' rows, each the chunk's queries in order
    qg = q.view(num_q, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim)
    scores = torch.matmul(qg, kv[:num_kv_heads].transpose(1, 2)).mul_(head_dim**-0.5)  # [kv, group*Q, C]
    q_pos = torch.arange(num_ctx - num_q, num_ctx).repeat(group).unsqueeze(1)
    scores.masked_fill_(torch.arange(num_ctx).unsqueeze(0) > q_pos, float("-inf"))
    out = torch.matmul(scores.softmax(dim=-1), kv[num_kv_heads:])  # [kv, group*Q, hd]
    return out.view(num_kv_heads, group, num_q, head_dim).permute(2, 0, 1, 3).reshape(num_q, num_heads, head_dim)


def _prefill_sdpa(q: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    num_q, slots = q.shape[0], span.context_slots
    num_ctx = slots.shape[0]
    if q.dtype in (torch.bfloat16, torch.float16):
        # padded queries come last and are dropped; padded keys (slot 0, any content) sit after
        # every real query's position, so the causal mask or the mask below hides them
        q = F.pad(q, (0, 0, 0, 0, 0, -num_q % (SHORT_CHUNK_PAD if num_q <= SHORT_CHUNK_PAD else PREFILL_PAD)))
        slots = F.pad(slots, (0, -num_ctx % PREFILL_PAD))
    num_kv_heads = kv_cache.shape[0] // 2
    kv = kv_cache.index_select(1, slots).unsqueeze(0)  # [1, 2*kv, C, hd]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, heads, Q, hd]
    if q.dtype == torch.bfloat16 and num_q >= PREFILL_FLOAT32_MIN_QUERIES and float32_wins_large_batches():
        kv, qh = kv.float(), qh.float()
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    if span.is_first_chunk:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, enable_gqa=True)
    else:
        # query i sits at context position num_ctx - num_q + i and may see keys up to there
        q_pos = torch.arange(num_ctx - num_q, num_ctx - num_q + qh.shape[2]).unsqueeze(1)
        mask = torch.arange(k.shape[2]).unsqueeze(0) <= q_pos
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)[:num_q].to(q.dtype)
