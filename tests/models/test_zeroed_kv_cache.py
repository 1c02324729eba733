"""KV cache tensors from anonymous memory: zero, writable, independent, and alive as long as the tensor."""

from __future__ import annotations

import gc

import pytest
import torch

from loom.models.attention import zeroed_kv_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_new_cache_is_all_zeros_in_the_asked_shape_and_dtype(dtype: torch.dtype) -> None:
    cache = zeroed_kv_cache((6, 4096, 64), dtype)
    assert cache.shape == (6, 4096, 64) and cache.dtype == dtype and cache.is_contiguous()
    assert not cache.any()


def test_caches_do_not_share_memory_and_outlive_their_mapping() -> None:
    first, second = zeroed_kv_cache((2, 1024, 8), torch.float32), zeroed_kv_cache((2, 1024, 8), torch.float32)
    gc.collect()  # nothing but the tensors holds the mappings now
    first.index_copy_(1, torch.tensor([3, 700]), torch.ones(2, 2, 8))
    assert float(first.sum()) == 2 * 2 * 8 and not second.any()
    assert first.data_ptr() % 4096 == 0  # page-aligned


def test_an_empty_cache_is_allowed() -> None:
    assert zeroed_kv_cache((2, 0, 8), torch.float32).numel() == 0
