"""Decode attention over the paged cache: both kernels (SDPA for few bf16 requests where it measures
faster, batched matmuls otherwise) give every request plain attention over its own context,
padding blocks unseen."""

from __future__ import annotations

import pytest
import torch

import loom.models.attention as attention
from loom.models.attention import SDPA_DECODE_MAX_REQUESTS, AttentionMetadata, _decode_attention, sdpa_wins_decode

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 32, 4, 64


def reference(q: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain float32 attention of one query `[heads, hd]` over the cached tokens at `slots`."""
    kv = kv_cache.float().index_select(1, slots)
    k = kv[:NUM_KV_HEADS].repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)  # [H, C, hd]
    v = kv[NUM_KV_HEADS:].repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)
    scores = torch.einsum("hd,hcd->hc", q.float(), k) * HEAD_DIM**-0.5
    return torch.einsum("hc,hcd->hd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("sdpa_wins", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_reqs", [1, 3, SDPA_DECODE_MAX_REQUESTS, SDPA_DECODE_MAX_REQUESTS + 1])
def test_each_request_attends_to_its_own_context_only(
    dtype: torch.dtype, num_reqs: int, sdpa_wins: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention, "sdpa_wins_decode", lambda *shape: sdpa_wins and dtype != torch.float32)
    gen = torch.Generator().manual_seed(num_reqs)
    kv_cache = torch.randn(2 * NUM_KV_HEADS, NUM_BLOCKS * BLOCK_SIZE, HEAD_DIM, generator=gen)
    kv_cache[:, :BLOCK_SIZE] = 50.0  # block 0 pads short tables: if it leaked into a softmax it would show
    kv_cache = kv_cache.to(dtype)
    blocks = (torch.randperm(NUM_BLOCKS - 1, generator=gen) + 1).tolist()
    lengths = [int(n) for n in torch.randint(1, 5 * BLOCK_SIZE, (num_reqs,), generator=gen)]
    max_blocks = -(-max(lengths) // BLOCK_SIZE)
    tables = []
    for n in lengths:
        own = [blocks.pop() for _ in range(-(-n // BLOCK_SIZE))]
        tables.append(own + [0] * (max_blocks - len(own)))
    table = torch.tensor(tables)
    gather = ((torch.arange(2 * NUM_KV_HEADS) * NUM_BLOCKS).unsqueeze(1) + table.reshape(1, -1)).reshape(-1)
    valid = torch.arange(max_blocks * BLOCK_SIZE).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    mask = torch.zeros(num_reqs, 1, max_blocks * BLOCK_SIZE, dtype=dtype).masked_fill_(
        ~valid.unsqueeze(1), float("-inf")
    )
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), BLOCK_SIZE, num_reqs, gather, mask, ())
    q = torch.randn(num_reqs, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    out = _decode_attention(q, kv_cache, meta)
    assert out.shape == q.shape and out.dtype == dtype
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-5
    for i, n in enumerate(lengths):
        pos = torch.arange(n)
        slots = table[i][pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        torch.testing.assert_close(out[i].float(), reference(q[i], kv_cache, slots), atol=tolerance, rtol=tolerance)


def test_the_kernel_choice_is_measured_once_per_head_shape_and_never_sdpa_for_float32() -> None:
    assert sdpa_wins_decode(torch.float32, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM) is False
    first = sdpa_wins_decode(torch.bfloat16, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM)
    assert isinstance(first, bool)
    assert sdpa_wins_decode(torch.bfloat16, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM) is first  # cached, not re-timed
    assert sdpa_wins_decode.cache_info().hits >= 1
