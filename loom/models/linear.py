"""Linear layers chosen when the model is built: one `LinearMethod` per `--quantization` value.

Owns how a weight is stored and multiplied: the methods, the modules they build, and the rule
that picks a kernel per call. Never reads files (loaders do) or decides where tensors are cached.

| method | stored | kernel |
|---|---|---|
| none | the weight in `dense_dtype` | oneDNN-packed (`dense_module`), else `F.linear` |
| int8 | int8 codes, one scale per output row, + a dense copy | `_weight_int8pack_mm` |
| int4 | 4-bit codes, scale and zero per 32 values of a row, + a dense copy | `_weight_int4pack_mm_for_cpu` |

A Q4_1 GGUF's blocks become int4 codes as they are (the same bits llama.cpp reads); a float
weight is quantized. The output head of an int4 model stays dense (`head_quantization`).

Few rows and many rows want different kernels. Weight-only kernels read 2-4x fewer bytes, which
pays while a step is memory-bound (few rows) and costs once it is compute-bound; on some CPUs
with native bf16 but no AMX, bf16 GEMMs are slower than float32 ones once compute-bound
(oneDNN-packed SmolLM2 linears, Intel AVX-512-bf16 guest, 2 threads: 645 vs 352 ms for a
512-token prefill chunk) while bf16 still wins at one row (5.5 vs 8.8 ms). So a
`RowSwitchLinear` holds a small-batch kernel and a large-batch one and takes, per call, how many
leading rows go to the small-batch kernel: the model passes its decode rows when a step has at
most `max_small_batch_rows` of them (`measure_small_batch_rows`, timed at build), else none; so do the
output tokens a grammar forced (chunks after the decode rows) when decode and forced rows together
fit; prompt rows always take the large-batch kernel.
Both hold exactly the same weight values (a quantized method's dense copy is its dequantized
codes; a float32 copy of bf16 is exact), and both give each row the same bits whatever the other
rows are (oneDNN-packed dense, PyTorch's weight-only kernels; MKL's `F.linear` does not: one row
goes through gemv), so a request's tokens depend on the batch it shares a step with only through
the decode-row count (with forced output rows, that count plus theirs) crossing `max_small_batch_rows`. One exception: an output head stored as
Q8_0 blocks in a GGUF file (`with_q8_blocks`) multiplies few rows by the file's own values in
float32, many rows by their bf16 rounding.

The split of work: `prepare` depends only on the file and the dtype (it is what the weight cache
stores); `build` is cheap and machine-specific (oneDNN packing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loom.models.gguf_blocks import GROUP_SIZE, Blocks, Q4Groups, as_float
from loom.models.native import (
    INT4_MAX_ROWS,
    INT4_TILE_ROWS,
    Q8_MAX_ROWS,
    Q8_TILE_ROWS,
    int4_matmul,
    int4_tiles,
    native_int4_supported,
    native_q8_supported,
    native_q8_tiled_supported,
    q8_0_matmul,
    q8_tiled_matmul,
    q8_tiles,
)
from loom.models.packed_linear import PackedLinear, can_pack, float32_wins_large_batches, has_native_bf16
from loom.models.timing import best_times, measured

QUANTIZATIONS = ("none", "int8", "int4")


# Decode-row counts at which `measure_small_batch_rows` times the two kernels. The crossover depends
# on the CPU. SmolLM2 bf16, int4 vs the float32 copy, Intel AVX-512-bf16 guest, 2 threads (whole
# decode forward, the two alternated in one process): 49.8 vs 65.0 ms at 12 rows, 62.4 vs 72.7 at
# 16, 86.6 vs 85.0 at 24, 112 vs 103 at 32. int4 vs packed bf16, 2-core AMD EPYC guest (whole engine
# step, alternated): 9.6 vs 13.0 ms at 1 row, 13.2 vs 15.2 at 4, 17.9 vs 17.5 at 8, 31.6 vs 28.1 at
# 16. Without native bf16 (float32 model with int4 linears vs oneDNN float32, 2-core AVX2 guest,
# best of 7): 31 vs 51 ms at 1 row, 54 vs 60 at 4, 90 vs 86 at 8, 119 vs 103 at 12.
SMALL_BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


def measure_small_batch_rows(linears: Sequence[RowSwitchLinear], dtype: torch.dtype) -> int:
    """The most decode rows (of `SMALL_BATCH_CANDIDATES`) up to which the small-batch kernels beat
    the large-batch ones, timed over these linears (a model's own: weights streamed from memory as
    in a step, not one cache-resident matrix); 0 when they never do.

    Interleaved, best of 3 passes per count; about 0.1-0.3 s for SmolLM2 on 2 cores, once per
    machine and set of linears (`timing.measured`).
    """
    shapes = sorted(
        {
            (
                type(lin.small).__name__,
                getattr(lin.small, "kernel", ""),
                str(lin.large.dtype),
                lin.in_features,
                lin.out_features,
            )
            for lin in linears
        }
    )
    digest = hashlib.blake2b(repr(shapes).encode(), digest_size=6).hexdigest()
    question = f"most decode rows (of {SMALL_BATCH_CANDIDATES}) for the small-batch kernels, {dtype}, {len(linears)} linears {digest}"
    return measured(question, lambda: _largest_small_batch(linears, dtype))


def _largest_small_batch(linears: Sequence[RowSwitchLinear], dtype: torch.dtype) -> int:
    largest = 0
    with torch.inference_mode():
        for rows in SMALL_BATCH_CANDIDATES:
            # The answer is kept for good, so one busy moment must not end the search: a count the
            # small-batch kernels lose is timed again (one first start on an Intel Xeon guest kept
            # 4 where every later start measured 8: 18.9 vs 26.8 ms over the 120 linears at 8 rows).
            if not _small_wins(linears, rows, dtype) and not _small_wins(linears, rows, dtype):
                break
            largest = rows
    return largest


def _small_wins(linears: Sequence[RowSwitchLinear], rows: int, dtype: torch.dtype) -> bool:
    inputs = {n: torch.randn(rows, n).to(dtype) for n in {lin.in_features for lin in linears}}
    small, large = best_times(
        [lambda: [lin.small(inputs[lin.in_features]) for lin in linears],
         lambda: [lin.large(inputs[lin.in_features]) for lin in linears]],
        3,
    )  # fmt: skip
    return small <= large


WeightSource = torch.Tensor | Blocks

# the op through torch's generated binding: ~2 us a call less than through `torch.ops.aten`
_INT4_MM = getattr(torch, "_weight_int4pack_mm_for_cpu", None) or torch.ops.aten._weight_int4pack_mm_for_cpu


def dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype dense matmuls run in: float32 for a bf16 model on a CPU without native bf16.

    There bf16 matmuls are emulated: SmolLM2's linears take ~2x longer at 1 row and ~5x longer at
    32 rows than in float32, so the dense copy is kept in float32 and activations are cast.
    """
    return torch.float32 if dtype == torch.bfloat16 and not has_native_bf16() else dtype


def quantized_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype of the weight-only kernels: bf16 for a float32 model too.

    PyTorch's CPU int8 / int4 weight-only kernels are vectorized for bf16 activations; with float32
    ones they ran ~15x slower on an AVX2 CPU. A float32 model's linears then round their inputs to
    bf16 on quantized calls (as a bf16 model's do on every call) and keep float32 everywhere else.
    """
    return torch.bfloat16 if dtype == torch.float32 else dtype


class LinearMethod(Protocol):
    name: str

    def prepare(self, source: WeightSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors `build` needs, from a `[out, in]` weight; depends only on the weight and dtype."""
        ...

    def build(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, float32_copy: bool = False) -> nn.Module:
        """A module computing `x @ W.T` for `x` `[rows, in]` in `dtype`; with `float32_copy`, a bf16
        dense weight also gets an exact float32 copy for large batches (`use_float32_copies`)."""
        ...


class DenseLinear(nn.Module):
    """`F.linear` on a weight stored in its compute dtype; activations are cast to it and back."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def _own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in memory of its own for PyTorch's weight-only kernels. `_weight_int8pack_mm` crashed
    (SIGSEGV inside the kernel) on weights that are views of the weight cache's file mapping, as
    `safetensors` returns them, when a tensor ended near the end of that mapping; a copy never did."""
    return tensor.clone(memory_format=torch.contiguous_format)


class Int8Linear(nn.Module):
    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", _own_memory(qweight), persistent=False)  # [out, in] int8
        self.register_buffer("scales", _own_memory(scales), persistent=False)  # [out], in the kernel's activation dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(self.scales.dtype), self.qweight, self.scales).to(x.dtype)


class Int4Linear(nn.Module):
    qweight: torch.Tensor
    scales_zeros: torch.Tensor

    def __init__(
        self, qweight: torch.Tensor, scales_zeros: torch.Tensor, tiles: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        """`tiles`: the same weight in the native kernel's layout (`native.int4_tiles`), which
        `LlamaModel`'s fused decode layers read and `forward` multiplies up to INT4_MAX_ROWS rows with."""
        super().__init__()
        self.tiles = None if tiles is None else tuple(_own_memory(tiles[k]) for k in ("tcodes", "tscales", "tzeros"))
        self.register_buffer(
            "qweight", _own_memory(qweight), persistent=False
        )  # [out, in / 2] uint8, the op's packed layout
        self.register_buffer(
            "scales_zeros", _own_memory(scales_zeros), persistent=False
        )  # [in / 32, out, 2]: w = (q - 8) * s + z
        # the call's arguments as a plain attribute: 120 calls a decode step, each reading two
        # buffers through nn.Module.__getattr__ (~0.7 us each on a 2-core EPYC guest) otherwise
        self._args = (self.qweight, GROUP_SIZE, self.scales_zeros)
        self._act_dtype = scales_zeros.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.tiles is not None
            and x.dtype == torch.bfloat16
            and 0 < x.shape[0] <= INT4_MAX_ROWS
            and x.stride(-1) == 1
        ):
            return int4_matmul(x, *self.tiles)  # what the fused decode layers run: the same bits
        if x.dtype == self._act_dtype:
            return _INT4_MM(x, *self._args)
        return _INT4_MM(x.to(self._act_dtype), *self._args).to(x.dtype)


class Q8Linear(nn.Module):
    """ggml Q8_0 blocks multiplied as the file stores them (native.q8_0_matmul), float32 out.

    Half the bytes of a bf16 copy, so it wins while a call is memory-bound (few rows); the output
    head of SmolLM2's GGUF file, 2-core AMD EPYC (Zen 4) guest, against the packed bf16 head
    (micro-benchmark, load 1.4): 1.7 vs 3.2 ms at 1 row, 1.4 vs 3.7 at 2, 2.5 vs 2.9 at 4, 5.3 vs
    3.9 at 8. A `RowSwitchLinear` holds it as the small-batch kernel beside the dense head.

    Where AVX-512 runs, the tiled kernel (`native.q8_tiled_matmul`: the same values, 16 output rows
    a vector) takes every call. That head on an Intel AVX512-BF16 guest without AMX (load ~0.9),
    tiled / per-row / oneDNN's float32 copy: 1.15 / 1.23 / 2.21 ms at 1 row, 2.26 / 3.70 / 3.66 at
    8, 6.49 / 14.6 / 9.24 at 32, 13.3 / 30.4 / 14.8 at 64.
    """

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """`codes` `[out, in]` int8 and `scales` `[out, in / 32]` float16, kept in the layout of the
        kernel that runs here: the tiled one's (`native.q8_tiles`, a copy) or as given."""
        super().__init__()
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self._tiled = native_q8_tiled_supported() and self.out_features % (2 * Q8_TILE_ROWS) == 0
        self.kernel = "tiled" if self._tiled else "rows"  # part of the key its timed crossover is kept under
        if self._tiled:
            codes, scales = q8_tiles(codes, scales)
        self.register_buffer("codes", _own_memory(codes), persistent=False)
        self.register_buffer("scales", _own_memory(scales), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:  # a step whose prefill chunk samples nothing asks for no logits
            return torch.empty(0, self.out_features, dtype=torch.float32)
        if self._tiled:
            return q8_tiled_matmul(x, self.codes, self.scales)
        parts = [
            q8_0_matmul(x[i : i + Q8_MAX_ROWS], self.codes, self.scales) for i in range(0, x.shape[0], Q8_MAX_ROWS)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def with_q8_blocks(dense: nn.Module, q8: Mapping[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """`dense` with a `Q8Linear` over the file's Q8_0 blocks (`q8_codes`, `q8_scales`) for few rows,
    where the native kernel runs; `dense` alone elsewhere or without blocks."""
    if not q8 or not native_q8_supported(dtype, q8["q8_codes"].device):
        return dense
    large = dense.large if isinstance(dense, RowSwitchLinear) else dense
    assert isinstance(large, PackedLinear | DenseLinear)
    return RowSwitchLinear(Q8Linear(q8["q8_codes"], q8["q8_scales"]), large)


class RowSwitchLinear(nn.Module):
    """The small-batch kernel for the leading `num_small_rows` rows of a call, the large-batch one for the rest."""

    def __init__(self, small: nn.Module, large: PackedLinear | DenseLinear) -> None:
        super().__init__()
        self.small, self.large = small, large
        self.in_features, self.out_features = large.in_features, large.out_features
        # plain attributes: submodules are found through nn.Module.__getattr__, and calling
        # `forward` skips the hook machinery; ~2 us a call, 120 calls a decode step
        self._small, self._large = small.forward, large.forward

    def forward(self, x: torch.Tensor, num_small_rows: int = 0) -> torch.Tensor:
        if num_small_rows >= x.shape[0]:
            return self._small(x)
        if num_small_rows <= 0:
            return self._large(x)
        return torch.cat([self._small(x[:num_small_rows]), self._large(x[num_small_rows:])])


def apply_linear(module: nn.Module, x: torch.Tensor, num_small_rows: int) -> torch.Tensor:
    """`module(x)`, telling a `RowSwitchLinear` how many leading rows may take its small-batch kernel."""
    return module.forward(x, num_small_rows) if isinstance(module, RowSwitchLinear) else module.forward(x)


class DenseMethod:
    name = "none"

    def prepare(self, source: WeightSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        weight = as_float(source)
        return {"weight": weight.to(dense_dtype(dtype)).contiguous()}

    def build(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, float32_copy: bool = False) -> nn.Module:
        return dense_module(tensors["weight"], float32_copy)


class Int8Method:
    name = "int8"

    def prepare(self, source: WeightSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        weight = as_float(source).float()
        act = quantized_dtype(dtype)
        scales = (weight.abs().amax(dim=1) / 127).to(act).clamp(min=torch.finfo(act).tiny)
        codes = torch.round(weight / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        dense = codes.float() * scales.float().unsqueeze(1)  # the values the int8 kernel multiplies by
        return {"qweight": codes, "scales": scales, "weight": dense.to(dense_dtype(dtype))}

    def build(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, float32_copy: bool = False) -> nn.Module:
        quantized = Int8Linear(tensors["qweight"], tensors["scales"])
        return RowSwitchLinear(quantized, large_batch_module(tensors["weight"], float32_copy))


class Int4Method:
    name = "int4"

    def prepare(self, source: WeightSource, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        groups = source if isinstance(source, Q4Groups) else quantize_q4(as_float(source))
        rows, cols = groups.shape
        # the kernel computes (code - 8) * scale + zero: Q4_1's code * d + m is zero = m + 8d
        scales = groups.scales.to(quantized_dtype(dtype))
        zeros = (groups.offsets + 8 * groups.scales).to(quantized_dtype(dtype))
        scales_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()  # [cols / 32, rows, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.codes.to(torch.int32), 1)
        centred = groups.codes.view(rows, -1, GROUP_SIZE).float() - 8
        dense = (centred * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).view(rows, cols)
        prepared = {"qweight": packed, "scales_zeros": scales_zeros, "weight": dense.to(dense_dtype(dtype))}
        if rows % INT4_TILE_ROWS == 0 and scales.dtype == torch.bfloat16:  # what the native kernel reads
            prepared |= int4_tiles(groups.codes, scales.contiguous(), zeros.contiguous())
        return prepared

    def build(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, float32_copy: bool = False) -> nn.Module:
        native = "tcodes" in tensors and native_int4_supported(dtype, tensors["tcodes"].device)
        tiles = {k: tensors[k] for k in ("tcodes", "tscales", "tzeros")} if native else None
        quantized = Int4Linear(tensors["qweight"], tensors["scales_zeros"], tiles)
        return RowSwitchLinear(quantized, large_batch_module(tensors["weight"], float32_copy))


# float32 copies of a bf16 model's dense weights are kept only while they take at most this much
# memory (SmolLM2's: ~0.55 GB): a larger model keeps one bf16 copy rather than tripling its memory.
FLOAT32_COPY_MAX_BYTES = 2 * 2**30


def use_float32_copies(bf16_weight_bytes: int) -> bool:
    """Whether a model with this many bytes of bf16 weights keeps float32 copies for large batches.

    A bf16 model times `float32_wins_large_batches` here, at build, whatever its size: prefill
    attention asks it too, and the step loop must find the answer cached, not time it."""
    if bf16_weight_bytes == 0:
        return False
    return float32_wins_large_batches() and 2 * bf16_weight_bytes <= FLOAT32_COPY_MAX_BYTES


def dense_module(weight: torch.Tensor, float32_copy: bool = False) -> nn.Module:
    """A dense linear over `weight`; with `float32_copy`, bf16 for few rows beside a float32 copy for many."""
    large = large_batch_module(weight, float32_copy)
    if large.dtype == weight.dtype:
        return large
    return RowSwitchLinear(PackedLinear(weight), large)


def large_batch_module(weight: torch.Tensor, float32_copy: bool = False) -> PackedLinear | DenseLinear:
    """The dense kernel for many rows: with `float32_copy`, a bf16 weight is packed as float32."""
    if not can_pack(weight.dtype, weight.device):
        return DenseLinear(weight)
    if float32_copy and weight.dtype == torch.bfloat16:
        return PackedLinear(weight.float())
    return PackedLinear(weight)


def quantize_q4(weight: torch.Tensor) -> Q4Groups:
    """Asymmetric 4-bit groups of 32 along each row (min and max of a group map to codes 0 and 15)."""
    rows, cols = weight.shape
    if cols % GROUP_SIZE:
        raise ValueError(f"int4 needs rows of a multiple of {GROUP_SIZE} values, not {cols}")
    groups = weight.float().view(rows, -1, GROUP_SIZE)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return Q4Groups(codes.view(rows, cols), scales, low)


def linear_method(name: str) -> LinearMethod:
    methods: dict[str, type[DenseMethod] | type[Int8Method] | type[Int4Method]] = {
        "none": DenseMethod,
        "int8": Int8Method,
        "int4": Int4Method,
    }
    if name not in methods:
        raise ValueError(f"unknown quantization {name!r}; choose one of {list(QUANTIZATIONS)}")
    return methods[name]()


def check_quantization(name: str) -> None:
    if name != "auto" and name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; choose one of {[*QUANTIZATIONS, 'auto']}")


def head_quantization(quantization: str) -> str:
    """The output head's method: int4 models keep it dense, as llama.cpp's Q4 files keep it 8-bit or more.

    Measured on SmolLM2 (teacher-forced against float32, tests/models/test_quantized_agreement.py):
    int4 layers with a dense head KL 0.0003, with an int8 head 0.0014, with an int4 head 0.046.
    """
    return "none" if quantization == "int4" else quantization


def resolve_quantization(requested: str, dtype: torch.dtype, weights_are_q4: bool) -> str:
    """`auto`: int4 where the weights are already 4-bit (a Q4_1 GGUF file's linears), else none.

    The int4 kernel then multiplies by the file's own 4-bit values (only their scales rounded to
    bf16); int8 or int4 of float weights would round the weights themselves, which `auto` never does.
    """
    check_quantization(requested)
    if requested != "auto":
        return requested
    return "int4" if dtype in (torch.bfloat16, torch.float32) and weights_are_q4 else "none"
