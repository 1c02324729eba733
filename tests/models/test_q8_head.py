"""An output head stored as Q8_0 blocks multiplies few rows by the file's own values (native
kernel, float32; where AVX-512 runs, the tiled kernel for any number of rows) and many rows by
their bf16 rounding; each row's result is its own."""

from __future__ import annotations

import pytest
import torch

from loom.models.gguf_blocks import Q8Blocks
from loom.models.linear import Q8Linear, RowSwitchLinear, dense_module, with_q8_blocks
from loom.models.native import (
    Q8_MAX_ROWS,
    native_q8_supported,
    native_q8_tiled_supported,
    q8_0_matmul,
    q8_tiled_matmul,
    q8_tiles,
)

pytestmark = pytest.mark.skipif(not native_q8_supported(torch.bfloat16, torch.device("cpu")), reason="no C compiler")


def _blocks(rows: int, cols: int, seed: int) -> Q8Blocks:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int8)
    scales = (torch.rand(rows, cols // 32, generator=gen) * 0.02 + 1e-4).half()
    scales[0, 0] = 6e-8  # a subnormal half
    return Q8Blocks(codes, scales)


def _assert_the_files_values_in_float32(got: torch.Tensor, x: torch.Tensor, blocks: Q8Blocks) -> None:
    expected = x.double() @ blocks.dequantize().double().t()
    assert got.dtype == torch.float32 and got.shape == expected.shape
    scale = (x.double().abs() @ blocks.dequantize().double().abs().t()).clamp(min=1e-30)
    assert float(((got.double() - expected).abs() / scale).max()) < 1e-6


@pytest.mark.parametrize(("rows", "cols"), [(1, 576), (3, 64), (5, 32), (16, 1536)])
def test_the_kernel_multiplies_by_the_files_values_in_float32(rows: int, cols: int) -> None:
    blocks = _blocks(301, cols, rows)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    _assert_the_files_values_in_float32(q8_0_matmul(x, blocks.codes, blocks.scales), x, blocks)


def test_a_rows_result_does_not_depend_on_the_other_rows() -> None:
    blocks = _blocks(257, 576, 3)
    x = torch.randn(Q8_MAX_ROWS, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    together = q8_0_matmul(x, blocks.codes, blocks.scales)
    for r in (0, 5, Q8_MAX_ROWS - 1):
        assert torch.equal(q8_0_matmul(x[r : r + 1], blocks.codes, blocks.scales)[0], together[r])


def test_the_kernel_refuses_what_it_cannot_run() -> None:
    blocks = _blocks(8, 64, 0)
    with pytest.raises(ValueError, match="refused"):
        q8_0_matmul(torch.zeros(Q8_MAX_ROWS + 1, 64, dtype=torch.bfloat16), blocks.codes, blocks.scales)
    with pytest.raises(ValueError, match="bf16"):
        q8_0_matmul(torch.zeros(1, 64), blocks.codes, blocks.scales)


def test_the_head_takes_the_kernel_for_leading_rows_and_the_dense_copy_for_the_rest() -> None:
    blocks = _blocks(1000, 64, 4)
    head = with_q8_blocks(
        dense_module(blocks.dequantize().to(torch.bfloat16)),
        {"q8_codes": blocks.codes, "q8_scales": blocks.scales},
        torch.bfloat16,
    )
    assert isinstance(head, RowSwitchLinear) and isinstance(head.small, Q8Linear)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    mixed = head(x, 18)  # more leading rows than one kernel call takes
    assert torch.equal(mixed[:18], torch.cat([q8_0_matmul(x[:16], blocks.codes, blocks.scales),
                                              q8_0_matmul(x[16:18], blocks.codes, blocks.scales)]))  # fmt: skip
    assert torch.equal(mixed[18:], head.large(x[18:]).float())
    # a step whose prefill chunk samples nothing asks the head for no rows
    assert head(x[:0], 0).shape == (0, 1000)
    # a float32 model has no native kernel for it: the dense head alone
    dense = dense_module(blocks.dequantize())
    assert with_q8_blocks(dense, {"q8_codes": blocks.codes, "q8_scales": blocks.scales}, torch.float32) is dense


tiled_only = pytest.mark.skipif(not native_q8_tiled_supported(), reason="the tiled kernel is built for AVX-512 only")


@tiled_only
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 40])
@pytest.mark.parametrize("cols", [64, 576])
def test_the_tiled_kernel_multiplies_by_the_files_values_in_float32(rows: int, cols: int) -> None:
    blocks = _blocks(96, cols, rows)
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    _assert_the_files_values_in_float32(q8_tiled_matmul(x, *q8_tiles(blocks.codes, blocks.scales)), x, blocks)


@tiled_only
def test_a_rows_result_in_the_tiled_kernel_is_its_own() -> None:
    blocks = _blocks(64, 576, 3)
    tiles = q8_tiles(blocks.codes, blocks.scales)
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    together = q8_tiled_matmul(x, *tiles)
    for r in (0, 9, 39):
        assert torch.equal(q8_tiled_matmul(x[r : r + 1], *tiles)[0], together[r])


@tiled_only
def test_a_head_of_whole_pairs_of_tiles_takes_the_tiled_kernel() -> None:
    blocks = _blocks(1024, 64, 5)
    head = with_q8_blocks(
        dense_module(blocks.dequantize().to(torch.bfloat16)),
        {"q8_codes": blocks.codes, "q8_scales": blocks.scales},
        torch.bfloat16,
    )
    assert isinstance(head, RowSwitchLinear) and isinstance(head.small, Q8Linear)
    x = torch.randn(24, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    assert torch.equal(head(x, 24), q8_tiled_matmul(x, *q8_tiles(blocks.codes, blocks.scales)))
