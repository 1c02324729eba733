"""Prefill attention pads bf16/fp16 spans to a few shapes (PyTorch's CPU flash attention keeps a
compiled kernel per shape forever); the padding must never change what a real query sees."""

from __future__ import annotations

import pytest
import torch

from loom.models.attention import PREFILL_PAD, PrefillSpan, _prefill_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_SLOTS = 6, 2, 32, 512


def reference(q: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Plain float32 attention: query i of Q sits at context position C - Q + i."""
    num_q, num_ctx = q.shape[0], slots.shape[0]
    kv = kv_cache.float().index_select(1, slots)
    k = kv[:NUM_KV_HEADS].repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)  # [H, C, hd]
    v = kv[NUM_KV_HEADS:].repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=0)
    scores = torch.einsum("qhd,hcd->hqc", q.float(), k) * HEAD_DIM**-0.5
    q_pos = torch.arange(num_ctx - num_q, num_ctx).unsqueeze(1)
    scores = scores.masked_fill(torch.arange(num_ctx).unsqueeze(0) > q_pos, float("-inf"))
    return torch.einsum("hqc,hcd->qhd", scores.softmax(dim=-1), v)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("num_q", "num_ctx"),
    [
        (1, 1),
        (37, 37),
        (PREFILL_PAD, PREFILL_PAD),
        (PREFILL_PAD + 1, PREFILL_PAD + 1),
        (1, 90),
        (3, 120),
        (16, 16),
        (16, 77),
        (21, 100),
        (64, 200),
    ],
)
def test_padded_prefill_matches_plain_attention(dtype: torch.dtype, num_q: int, num_ctx: int) -> None:
    gen = torch.Generator().manual_seed(num_q * 1000 + num_ctx)
    # slot 0 holds huge values: a padded key that leaked into a real query's softmax would show
    kv_cache = torch.randn(2 * NUM_KV_HEADS, NUM_SLOTS, HEAD_DIM, generator=gen)
    kv_cache[:, 0] = 50.0
    kv_cache = kv_cache.to(dtype)
    slots = torch.randperm(NUM_SLOTS - 1, generator=gen)[:num_ctx] + 1
    q = torch.randn(num_q, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    span = PrefillSpan(0, num_q, slots, is_first_chunk=num_q == num_ctx)
    out = _prefill_attention(q, kv_cache, span)
    assert out.shape == (num_q, NUM_HEADS, HEAD_DIM) and out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference(q, kv_cache, slots), atol=tol, rtol=tol)
