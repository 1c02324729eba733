"""Prefill attention: every kernel gives each query plain causal attention over its context. SDPA
pads bf16/fp16 spans to a few shapes (PyTorch's CPU flash attention keeps a compiled kernel per
shape forever), and the padding must never change what a real query sees; the batched matmuls
take a chunk only where they measure faster and its scores fit their cap; the native kernel
(AVX512-BF16 builds) takes every bf16 chunk where it measures faster than both, and a query's
result there does not depend on how its prompt was chunked."""

from __future__ import annotations

import pytest
import torch

import loom.models.attention as attention
from loom.models.attention import PREFILL_PAD, PrefillSpan, _prefill_matmuls, _prefill_sdpa
from loom.models.native import native_prefill_supported, prefill_attention

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_SLOTS = 6, 2, 32, 512

needs_native = pytest.mark.skipif(
    not native_prefill_supported(torch.bfloat16, torch.device("cpu"), NUM_HEADS, NUM_KV_HEADS, HEAD_DIM),
    reason="the native prefill kernel needs AVX512-BF16 and a C compiler",
)


def _native(q: torch.Tensor, kv_cache: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    if q.dtype != torch.bfloat16:
        pytest.skip("the native prefill kernel reads bf16")
    return prefill_attention(q, kv_cache, span.context_slots)


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


@pytest.mark.parametrize("kernel", [_prefill_sdpa, _prefill_matmuls, pytest.param(_native, marks=needs_native)])
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
        (150, 333),
    ],
)
def test_prefill_matches_plain_attention(kernel: object, dtype: torch.dtype, num_q: int, num_ctx: int) -> None:
    gen = torch.Generator().manual_seed(num_q * 1000 + num_ctx)
    # slot 0 holds huge values: a padded key that leaked into a real query's softmax would show
    kv_cache = torch.randn(2 * NUM_KV_HEADS, NUM_SLOTS, HEAD_DIM, generator=gen)
    kv_cache[:, 0] = 50.0
    kv_cache = kv_cache.to(dtype)
    slots = torch.randperm(NUM_SLOTS - 1, generator=gen)[:num_ctx] + 1
    q = torch.randn(num_q, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    span = PrefillSpan(0, num_q, slots, is_first_chunk=num_q == num_ctx)
    out = kernel(q, kv_cache, span)  # type: ignore[operator]
    assert out.shape == (num_q, NUM_HEADS, HEAD_DIM) and out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), reference(q, kv_cache, slots), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("sdpa_wins", "max_scores", "expected"), [(False, 10**9, "matmuls"), (True, 10**9, "sdpa"), (False, 100, "sdpa")]
)
def test_a_chunk_takes_the_matmuls_only_where_they_win_and_its_scores_fit(
    sdpa_wins: bool, max_scores: int, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[str] = []
    monkeypatch.setattr(attention, "native_wins_prefill", lambda *shape: False)
    monkeypatch.setattr(attention, "sdpa_wins_prefill", lambda *shape: sdpa_wins)
    monkeypatch.setattr(attention, "PREFILL_MATMUL_MAX_SCORES", max_scores)
    monkeypatch.setattr(attention, "_prefill_sdpa", lambda *args: taken.append("sdpa"))
    monkeypatch.setattr(attention, "_prefill_matmuls", lambda *args: taken.append("matmuls"))
    q = torch.zeros(8, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    kv_cache = torch.zeros(2 * NUM_KV_HEADS, NUM_SLOTS, HEAD_DIM, dtype=torch.bfloat16)
    attention._prefill_attention(q, kv_cache, PrefillSpan(0, 8, torch.arange(8), is_first_chunk=True))
    assert taken == [expected]


def test_float32_prefill_never_takes_the_matmuls() -> None:
    assert attention.sdpa_wins_prefill(torch.float32, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM) is True


def test_a_bf16_chunk_takes_the_native_kernel_where_it_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[str] = []
    monkeypatch.setattr(attention, "native_wins_prefill", lambda *shape: True)
    monkeypatch.setattr(attention, "prefill_attention", lambda *args: taken.append("native"))
    q = torch.zeros(8, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    kv_cache = torch.zeros(2 * NUM_KV_HEADS, NUM_SLOTS, HEAD_DIM, dtype=torch.bfloat16)
    attention._prefill_attention(q, kv_cache, PrefillSpan(0, 8, torch.arange(8), is_first_chunk=True))
    assert taken == ["native"]


@needs_native
@pytest.mark.parametrize("split", [1, 16, 37, 99])
def test_native_results_do_not_depend_on_how_the_prompt_was_chunked(split: int) -> None:
    gen = torch.Generator().manual_seed(split)
    num_ctx = 100
    kv_cache = torch.randn(2 * NUM_KV_HEADS, NUM_SLOTS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    slots = torch.randperm(NUM_SLOTS, generator=gen)[:num_ctx]
    q = torch.randn(num_ctx, NUM_HEADS, HEAD_DIM, generator=gen).to(torch.bfloat16)
    whole = prefill_attention(q, kv_cache, slots)
    first, rest = prefill_attention(q[:split], kv_cache, slots[:split]), prefill_attention(q[split:], kv_cache, slots)
    assert torch.equal(torch.cat([first, rest]), whole)
