"""Linear methods: GGUF blocks decoded exactly, quantized kernels and their dense copies computing
with the same weights, and the rule that picks one of them by the number of rows in a call."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from torch import nn

from loom.models import linear as linear_module
from loom.models.gguf_blocks import Q4Groups, q4_1_groups, q8_0_values
from loom.models.linear import (
    FLOAT32_COPY_MAX_BYTES,
    SMALL_BATCH_CANDIDATES,
    DenseLinear,
    RowSwitchLinear,
    apply_linear,
    dense_dtype,
    linear_method,
    measure_small_batch_rows,
    quantize_q4,
    resolve_quantization,
    use_float32_copies,
)
from loom.models.packed_linear import PackedLinear, can_pack, has_native_bf16

OUT, IN = 96, 128  # multiples of the 32-value groups the quantized formats work in


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0)) * 0.05


@pytest.fixture(scope="module")
def q4_1(weight: torch.Tensor) -> tuple[np.ndarray, Q4Groups]:
    raw = quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    return raw, q4_1_groups(raw, OUT, IN)


def _rows(num_rows: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(num_rows, IN, generator=torch.Generator().manual_seed(num_rows)).to(dtype)


def test_q4_1_and_q8_0_blocks_decode_to_ggufs_own_values(
    weight: torch.Tensor, q4_1: tuple[np.ndarray, Q4Groups]
) -> None:
    raw, groups = q4_1
    expected = torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1).copy())
    assert torch.equal(groups.dequantize(), expected)  # bit for bit: same float32 operations
    assert groups.codes.dtype == torch.uint8 and int(groups.codes.max()) <= 15
    raw8 = quantize(weight.numpy(), GGMLQuantizationType.Q8_0)
    assert torch.equal(q8_0_values(raw8, OUT, IN), torch.from_numpy(dequantize(raw8, GGMLQuantizationType.Q8_0).copy()))


def test_int4_from_q4_1_multiplies_by_the_files_values(q4_1: tuple[np.ndarray, Q4Groups]) -> None:
    _, groups = q4_1
    tensors = linear_method("int4").prepare(groups, torch.float32)
    dense = tensors["weight"].float()
    file_values = groups.dequantize()
    # only the per-group scale and zero are rounded (to the kernel's bf16): well under a 4-bit step
    step = groups.scales.repeat_interleave(32, dim=1)
    assert float(((dense - file_values).abs() / step).max()) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_kernel_and_dense_copy_compute_with_the_same_weights(
    weight: torch.Tensor, quantization: str, dtype: torch.dtype
) -> None:
    tensors = linear_method(quantization).prepare(weight, dtype)
    module = linear_method(quantization).build(tensors, dtype)
    assert isinstance(module, RowSwitchLinear)
    for num_rows in (1, 5, 40):
        x = _rows(num_rows, dtype)
        quantized, dense = module.small(x), module.large(x)
        assert quantized.dtype == dense.dtype == dtype
        # the same weights, so only rounding differs: bf16 activations on the quantized kernel
        exact = F.linear(x.float(), tensors["weight"].float())
        scale = float(exact.abs().max())
        assert float((dense.float() - exact).abs().max()) < 1e-2 * scale
        assert float((quantized.float() - exact).abs().max()) < 1e-2 * scale


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantization_error_is_bounded(weight: torch.Tensor, quantization: str) -> None:
    tensors = linear_method(quantization).prepare(weight, torch.float32)
    error = (tensors["weight"].float() - weight).abs().max()
    bound = weight.abs().max() / 127 if quantization == "int8" else (weight.max() - weight.min()) / 15
    assert float(error) <= float(bound)  # half a step of the coarsest group, with room for bf16 scales


def test_quantize_q4_maps_each_groups_range_onto_16_codes(weight: torch.Tensor) -> None:
    groups = quantize_q4(weight)
    assert int(groups.codes.min()) == 0 and int(groups.codes.max()) == 15
    half_step = groups.scales.repeat_interleave(32, dim=1) / 2
    assert bool(((groups.dequantize() - weight).abs() <= half_step * 1.0001).all())


class _Constant(nn.Module):
    def __init__(self, value: float, slow_above_rows: int | None = None, delay_s: float = 0.0) -> None:
        super().__init__()
        self.value, self.slow_above_rows, self.delay_s = value, slow_above_rows, delay_s
        self.in_features, self.out_features, self.dtype = 4, 1, torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slow_above_rows is not None and x.shape[0] > self.slow_above_rows:
            time.sleep(self.delay_s)
        return torch.full((x.shape[0], 1), self.value)


def test_the_leading_rows_take_the_small_batch_kernel_the_rest_the_large_batch_one() -> None:
    module = RowSwitchLinear(_Constant(1.0), _Constant(2.0))  # type: ignore[arg-type]
    x = torch.zeros(6, 4)
    for num_quantized, expected in [(0, [2.0] * 6), (2, [1.0] * 2 + [2.0] * 4), (6, [1.0] * 6), (9, [1.0] * 6)]:
        assert module(x, num_quantized).flatten().tolist() == expected, num_quantized
    assert module(x).flatten().tolist() == [2.0] * 6  # a plain call is a prefill: large-batch
    assert apply_linear(nn.Identity(), x, 3) is x  # modules with one kernel ignore the count


@pytest.mark.parametrize(("slow_above_rows", "expected"), [(4, 4), (0, 0), (1000, SMALL_BATCH_CANDIDATES[-1])])
def test_decode_steps_take_the_small_batch_kernels_up_to_the_measured_crossover(
    slow_above_rows: int, expected: int
) -> None:
    # the large-batch kernel takes 1 ms a call, the small-batch one 3 ms above `slow_above_rows`
    # rows and nothing below: the timing must find that edge
    small, large = _Constant(1.0, slow_above_rows, 0.003), _Constant(2.0, 0, 0.001)
    linears = [RowSwitchLinear(small, large) for _ in range(3)]  # type: ignore[arg-type]
    assert measure_small_batch_rows(linears, torch.float32) == expected


class _BusyOnce(_Constant):
    """Fast up to 8 rows, but slow for its first `busy_calls` calls at `busy_rows`: a busy moment."""

    def __init__(self, busy_rows: int, busy_calls: int) -> None:
        super().__init__(1.0, 8, 0.003)
        self.busy_rows, self.busy_calls = busy_rows, busy_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.busy_rows and self.busy_calls > 0:
            self.busy_calls -= 1
            time.sleep(0.003)
        return super().forward(x)


def test_one_busy_moment_does_not_end_the_crossover_search() -> None:
    # three linears, three rounds: the small-batch kernels lose every call of one timing at 4 rows
    small = _BusyOnce(busy_rows=4, busy_calls=9)
    linears = [RowSwitchLinear(small, _Constant(2.0, 0, 0.001)) for _ in range(3)]  # type: ignore[arg-type]
    assert measure_small_batch_rows(linears, torch.float32) == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_each_row_gets_the_same_bits_whatever_rows_share_the_call(
    weight: torch.Tensor, quantization: str, dtype: torch.dtype
) -> None:
    """What keeps a request's tokens independent of its batch: no kernel lets one row's result depend on others."""
    method = linear_method(quantization)
    module = method.build(method.prepare(weight, dtype), dtype)
    kernels = [module.small, module.large] if isinstance(module, RowSwitchLinear) else [module]
    x = _rows(40, dtype)
    for kernel in kernels:
        alone = torch.cat([kernel(x[i : i + 1]) for i in range(len(x))])
        for num_rows in (2, 3, 5, 17, 40):
            assert torch.equal(kernel(x[:num_rows]), alone[:num_rows]), (type(kernel).__name__, num_rows)


def test_dense_method_keeps_one_copy_in_the_dtype_matmuls_run_in(weight: torch.Tensor) -> None:
    tensors = linear_method("none").prepare(weight, torch.bfloat16)
    assert tensors.keys() == {"weight"} and tensors["weight"].dtype == dense_dtype(torch.bfloat16)
    module = linear_method("none").build(tensors, torch.bfloat16)
    out = module(_rows(3, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert isinstance(
        module, PackedLinear if can_pack(dense_dtype(torch.bfloat16), torch.device("cpu")) else DenseLinear
    )


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_a_float32_copy_takes_large_batches_when_asked(weight: torch.Tensor, quantization: str) -> None:
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        pytest.skip("bf16 is not native on this CPU: the dense copy is float32 already")
    method = linear_method(quantization)
    tensors = method.prepare(weight, torch.bfloat16)
    module = method.build(tensors, torch.bfloat16, float32_copy=True)
    assert isinstance(module, RowSwitchLinear) and module.large.dtype == torch.float32
    x = _rows(40, torch.bfloat16)
    exact = F.linear(x.float(), tensors["weight"].float())
    torch.testing.assert_close(module(x).float(), exact.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)
    kept = method.build(tensors, torch.bfloat16)
    large = kept.large if isinstance(kept, RowSwitchLinear) else kept
    assert large.dtype == torch.bfloat16


def test_float32_copies_are_kept_only_for_small_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_module, "float32_wins_large_batches", lambda: True)
    assert use_float32_copies(FLOAT32_COPY_MAX_BYTES // 2)
    assert not use_float32_copies(FLOAT32_COPY_MAX_BYTES // 2 + 1)  # a 7B model must not triple its memory
    monkeypatch.setattr(linear_module, "float32_wins_large_batches", lambda: False)
    assert not use_float32_copies(1)


def test_bf16_matmuls_run_in_float32_where_the_cpu_has_no_native_bf16() -> None:
    assert dense_dtype(torch.float32) == torch.float32
    assert dense_dtype(torch.bfloat16) == (torch.bfloat16 if has_native_bf16() else torch.float32)


def test_onednn_packing_is_offered_only_where_it_works(weight: torch.Tensor) -> None:
    """On CPUs without AVX-512 oneDNN refuses to reorder bf16 weights; `loom serve` must not try."""
    if not can_pack(torch.bfloat16, torch.device("cpu")):
        assert not has_native_bf16()
        return
    w = weight.to(torch.bfloat16)
    x = _rows(4, torch.bfloat16)
    torch.testing.assert_close(PackedLinear(w)(x), F.linear(x, w))


def test_auto_quantizes_only_weights_that_are_already_4_bit() -> None:
    assert resolve_quantization("auto", torch.bfloat16, weights_are_q4=True) == "int4"
    assert resolve_quantization("auto", torch.float32, weights_are_q4=True) == "int4"
    assert resolve_quantization("auto", torch.bfloat16, weights_are_q4=False) == "none"
    assert resolve_quantization("auto", torch.float16, weights_are_q4=True) == "none"
    assert resolve_quantization("int8", torch.bfloat16, weights_are_q4=False) == "int8"
    with pytest.raises(ValueError, match="int3"):
        resolve_quantization("int3", torch.bfloat16, weights_are_q4=False)
