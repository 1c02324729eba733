"""oneDNN-prepacked linear layers, and which CPUs compute in bf16 natively.

Reordering a weight once into oneDNN's blocked layout (what `torch.compile`'s freezing pass does)
makes every later matmul skip that work: about 2x faster at batch 1 and 1.3x at batch 32 on an
AVX-512-bf16 CPU for SmolLM2's shapes (bf16), and up to 1.3x over MKL in float32 on an AVX2 CPU.
Each row's result is the same whatever the other rows (MKL's `F.linear` sends a single row to
gemv, whose bits differ), which keeps a request's tokens independent of its batch. bf16 packs only
on a CPU with native bf16 (AVX-512-bf16 or AMX): elsewhere oneDNN refuses the reorder, and
`linear.dense_dtype` computes a bf16 model's matmuls in float32. Never decides which layers are
packed (linear.py does).
"""

from __future__ import annotations

import functools

import torch
from torch import nn


@functools.cache
def has_native_bf16() -> bool:
    """AVX-512-bf16 or AMX: bf16 matmuls run in hardware (elsewhere they are emulated, ~5x slower than float32)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


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
