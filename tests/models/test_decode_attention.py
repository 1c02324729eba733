"""Decode attention over the paged cache: every kernel (the native one reading blocks in place; on
the torch path SDPA for few bf16 requests where it measures faster, batched matmuls otherwise)
gives every request plain attention over its own context, padding blocks unseen."""

from __future__ import annotations

import shutil

import pytest
import torch

import loom.models.attention as attention
from loom.models.attention import (
    SDPA_DECODE_MAX_REQUESTS,
    AttentionMetadata,
    DecodeBlocks,
    DecodeGather,
    _decode_attention,
    sdpa_wins_decode,
)
from loom.models.native import native_decode_supported, paged_decode

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 32, 4, 256

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


def reference(q: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain float32 attention of one query `[heads, hd]` over the cached tokens at `slots`."""
    num_kv_heads = kv_cache.shape[0] // 2
    kv = kv_cache.float().index_select(1, slots)
    k = kv[:num_kv_heads].repeat_interleave(q.shape[0] // num_kv_heads, dim=0)  # [H, C, hd]
    v = kv[num_kv_heads:].repeat_interleave(q.shape[0] // num_kv_heads, dim=0)
    scores = torch.einsum("hd,hcd->hc", q.float(), k) * q.shape[1] ** -0.5
    return torch.einsum("hc,hcd->hd", scores.softmax(dim=-1), v)


def scenario(
    num_reqs: int, dtype: torch.dtype, seed: int, num_heads: int = NUM_HEADS, num_kv_heads: int = NUM_KV_HEADS,
    head_dim: int = HEAD_DIM, lengths: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:  # fmt: skip
    """A cache whose block 0 (the padding block) would show if read, requests' blocks shuffled
    through it; returns (cache, queries, block table, context lengths)."""
    gen = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(2 * num_kv_heads, NUM_BLOCKS * BLOCK_SIZE, head_dim, generator=gen)
    kv_cache[:, :BLOCK_SIZE] = 50.0  # block 0 pads short tables: if it leaked into a softmax it would show
    kv_cache = kv_cache.to(dtype)
    blocks = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1).tolist()
    if lengths is None:
        lengths = [int(n) for n in torch.randint(1, 5 * BLOCK_SIZE, (num_reqs,), generator=gen)]
    max_blocks = -(-max(lengths) // BLOCK_SIZE)
    tables = []
    for n in lengths:
        own = [blocks.pop() for _ in range(-(-n // BLOCK_SIZE))]
        tables.append(own + [0] * (max_blocks - len(own)))
    q = torch.randn(len(lengths), num_heads, head_dim, generator=gen).to(dtype)
    return kv_cache, q, torch.tensor(tables), lengths


def torch_path_context(table: torch.Tensor, lengths: list[int], num_kv_heads: int, dtype: torch.dtype) -> DecodeGather:
    max_blocks = table.shape[1]
    gather = ((torch.arange(2 * num_kv_heads) * NUM_BLOCKS).unsqueeze(1) + table.reshape(1, -1)).reshape(-1)
    valid = torch.arange(max_blocks * BLOCK_SIZE).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    mask = torch.zeros(len(lengths), 1, max_blocks * BLOCK_SIZE, dtype=dtype).masked_fill_(
        ~valid.unsqueeze(1), float("-inf")
    )
    return DecodeGather(gather, mask)


def native_context(table: torch.Tensor, lengths: list[int]) -> DecodeBlocks:
    return DecodeBlocks(table.to(torch.int32), torch.tensor(lengths, dtype=torch.int32))


def assert_each_attends_its_own(out, q, kv_cache, table, lengths, tolerance: float) -> None:  # noqa: ANN001
    assert out.shape == q.shape and out.dtype == q.dtype
    for i, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = table[i][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        torch.testing.assert_close(out[i].float(), reference(q[i], kv_cache, slots), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("sdpa_wins", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_reqs", [1, 3, SDPA_DECODE_MAX_REQUESTS, SDPA_DECODE_MAX_REQUESTS + 1])
def test_the_torch_path_attends_each_request_to_its_own_context_only(
    dtype: torch.dtype, num_reqs: int, sdpa_wins: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "sdpa_wins_decode", lambda *shape: sdpa_wins and dtype != torch.float32)
    kv_cache, q, table, lengths = scenario(num_reqs, dtype, seed=num_reqs)
    ctx = torch_path_context(table, lengths, NUM_KV_HEADS, dtype)
    out = _decode_attention(
        q, kv_cache, AttentionMetadata(torch.zeros(0, dtype=torch.long), BLOCK_SIZE, num_reqs, ctx, ())
    )
    assert_each_attends_its_own(out, q, kv_cache, table, lengths, 3e-2 if dtype == torch.bfloat16 else 1e-5)


@needs_compiler
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [
        (NUM_HEADS, NUM_KV_HEADS, HEAD_DIM),
        (9, 3, 64),
        (8, 2, 64),
        (4, 4, 64),
        (4, 4, 128),
        (4, 2, 128),
        (8, 1, 48),
        (32, 2, 16),
    ],
)
@pytest.mark.parametrize("num_reqs", [1, 5, 33])
def test_the_native_kernel_attends_each_request_to_its_own_context_only(
    num_reqs: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> None:
    assert native_decode_supported(torch.bfloat16, torch.device("cpu"), num_heads, num_kv_heads, head_dim, BLOCK_SIZE)
    kv_cache, q, table, lengths = scenario(num_reqs, torch.bfloat16, num_reqs, num_heads, num_kv_heads, head_dim)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), BLOCK_SIZE, num_reqs, native_context(table, lengths), ())
    out = _decode_attention(q, kv_cache, meta)
    # float32 inside: only the output's bf16 rounding (0.4% relative) separates it from the reference
    assert_each_attends_its_own(out, q, kv_cache, table, lengths, 1e-2)


@needs_compiler
def test_the_native_kernel_reads_whole_and_partial_blocks_and_single_tokens() -> None:
    lengths = [1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE, 3 * BLOCK_SIZE - 1]
    kv_cache, q, table, lengths = scenario(len(lengths), torch.bfloat16, 7, lengths=lengths)
    ctx = native_context(table, lengths)
    out = paged_decode(q, kv_cache, ctx.block_table, ctx.context_lens, BLOCK_SIZE)
    assert_each_attends_its_own(out, q, kv_cache, table, lengths, 1e-2)


@needs_compiler
def test_the_native_kernel_gives_a_request_the_same_bits_alone_or_batched() -> None:
    kv_cache, q, table, lengths = scenario(12, torch.bfloat16, 3)
    fused = torch.randn(12, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    fused[:, :NUM_HEADS] = q
    strided = fused[:, :NUM_HEADS]  # decode queries are a view of the fused projection
    ctx = native_context(table, lengths)
    batched = paged_decode(strided, kv_cache, ctx.block_table, ctx.context_lens, BLOCK_SIZE)
    for i in range(12):
        alone = native_context(table[i : i + 1, : -(-lengths[i] // BLOCK_SIZE)], [lengths[i]])
        one = paged_decode(q[i : i + 1], kv_cache, alone.block_table, alone.context_lens, BLOCK_SIZE)
        assert torch.equal(one[0], batched[i])


def test_the_native_kernel_declines_what_it_cannot_run() -> None:
    cpu = torch.device("cpu")
    assert not native_decode_supported(torch.float32, cpu, 9, 3, 64, 16)
    assert not native_decode_supported(torch.float16, cpu, 9, 3, 64, 16)
    assert not native_decode_supported(torch.bfloat16, cpu, 9, 3, 512, 16)  # head_dim over 256
    assert not native_decode_supported(torch.bfloat16, cpu, 9, 3, 64, 128)  # blocks over 64 tokens
    assert not native_decode_supported(torch.bfloat16, cpu, 34, 2, 64, 16)  # 17 query heads per KV head
    assert not native_decode_supported(torch.bfloat16, torch.device("meta"), 9, 3, 64, 16)


def test_the_kernel_choice_is_measured_once_per_head_shape_and_never_sdpa_for_float32() -> None:
    assert sdpa_wins_decode(torch.float32, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM) is False
    first = sdpa_wins_decode(torch.bfloat16, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    assert isinstance(first, bool)
    assert sdpa_wins_decode(torch.bfloat16, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM) is first  # cached, not re-timed
    assert sdpa_wins_decode.cache_info().hits >= 1
