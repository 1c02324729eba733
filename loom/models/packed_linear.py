"""oneDNN-prepacked linear layers, and which CPUs compute in bf16 natively.

Reordering a weight once into oneDNN's blocked layout (what `torch.compile`'s freezing pass does)
makes every later matmul skip that work: about 2x faster at batch 1 and 1.3x at batch 32 on an
AVX-512-bf16 CPU for SmolLM2's shapes (bf16), and up to 1.3x over MKL in float32 on an AVX2 CPU.
Each row's result is the same whatever the other rows (MKL's `F.linear` sends a single row to
gemv, whose bits differ), which keeps a request's tokens independent of its batch. bf16 packs only
on a CPU with native bf16 (AVX-512-bf16 or AMX): elsewhere oneDNN refuses the reorder, and
`linear.dense_dtype` computes a bf16 model's matmuls in float32. Where bf16 is native but float32
measures faster once compute-bound (`float32_wins_large_batches`), linear.py keeps a float32 copy
for large batches. Never decides which layers are packed (linear.py does).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from loom.models.timing import best_times, measured


@functools.cache
def has_native_bf16() -> bool:
    """AVX-512-bf16 or AMX: bf16 matmuls run in hardware (elsewhere they are emulated, ~5x slower than float32)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


@functools.cache
def float32_wins_large_batches() -> bool:
    """Whether packed float32 GEMMs beat packed bf16 ones on this CPU at 128 rows, by a clear margin.

    Measured, not read from CPU flags: on an Intel AVX-512-bf16 guest without AMX they did (SmolLM2's
    linears for a 512-token prefill chunk: 352 vs 645 ms, while bf16 won at one row, 5.5 vs 8.8 ms);
    AMX CPUs run bf16 several times faster. Timed once per machine (`timing.measured`), with the threads the engine runs
    with, on a weight small enough to stay in cache (~30 ms).
    """
    if not (has_native_bf16() and can_pack(torch.bfloat16, torch.device("cpu"))):
        return False
    return measured("packed float32 GEMMs beat bf16 at 128 rows", _time_float32_against_bf16)


def _time_float32_against_bf16() -> bool:
    weight = torch.randn(2048, 1024)
    x = torch.randn(128, 1024)
    kernels = {
        dtype: (x.to(dtype), torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), 128))
        for dtype in (torch.float32, torch.bfloat16)
    }
    float32, bf16 = best_times(
        [lambda k=k: torch.ops.mkldnn._linear_pointwise(*k, None, "none", [], "") for k in kernels.values()], 5
    )
    return float32 < 0.8 * bf16


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    """float32 anywhere oneDNN runs, bf16 where the CPU has it natively (oneDNN refuses it elsewhere)."""
    return (
        device.type == "cpu"
        and (dtype == torch.float32 or (dtype == torch.bfloat16 and has_native_bf16()))
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, batch_size_hint: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = weight.shape[1], weight.shape[0], weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_size_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In the weight's dtype (a bf16 model's float32 copy casts activations there and back)."""
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, None, "none", [], "")
        return y.to(x.dtype)
