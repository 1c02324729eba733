"""Native CPU kernels (csrc/*.c): built once per machine, loaded with ctypes.

Decode attention (csrc/paged_decode.c). PyTorch has no CPU attention over a paged cache, so the
torch path (attention.py) first gathers every request's whole context into one tensor and then
multiplies it: the context is read twice and written once per layer, and bf16 batched matmuls over 1-4 queries are slow on CPUs without
AMX. The kernel reads each K and V row in place, once, in float32 (more exact than the torch
path's bf16 scores). SmolLM2 shapes, 30 layers of ~220-token contexts spread over a 1 GiB cache,
2-core AMD EPYC (Zen 4) guest: 0.6-0.8 vs 4.2-7.2 ms per step at 1 request, 3.2-4.0 vs 7.7-10.5 at
4, 24 vs 25-38 at 32, 45-51 vs 56-94 at 64.

The kernel sums each key's dot products 16 keys at a time (one shuffle tree for 16 sums, where a
horizontal sum per key took four rounds of its own): 30 layers of 32-row decode over ~225-token
contexts, 2-core Intel Xeon guest with AMX, old and new alternated three times (load 0.5-1.2):
16.7-17.8 vs 17.8-19.6 ms best. For the common head shapes every head's value sums then stay in
registers through a block, each V row converted once for the whole group, and the softmax's
scale and max run 16 at a time: 12.3-12.9 vs 15.4-16.4 ms best (alternated three times, load
0.4-0.7).

Prefill attention (csrc/prefill_attention.c, AVX512-BF16 builds): a chunk's queries over their
context read in place by slot, every query head of a KV head in one tile, one dot instruction per
pair of dimensions for 16 keys' scores, an online softmax and V in float32. Before it, PyTorch's
SDPA took 0.96 s of a 32-stream run of 160-token prompts (engine only, 2-core AMD EPYC Zen 4
guest, load ~0.9): 0.35 s with it, and the run 11.75 -> 10.94 s. Where SDPA's bf16 tiles are
faster (AMX), the timing in attention.py keeps SDPA.

Layer steps (csrc/layer_ops.c): a bf16 decoder layer's RMSNorms, and its RoPE with the K/V cache
write, each one pass. At one decode row a step is mostly small kernels: F.rms_norm alone is 8 of
them, ~13.5 us a call against ~0.5 us for a ctypes call on the same 2-core guest. Their bf16
roundings run 16 values at a time (bf16.h, bit for bit as one at a time): RoPE with the cache
write over 512 rows 574 -> 59 us, over 32 rows 73 -> 11 us (Intel AMX guest, load 0.5). The MLP's
SiLU x up for rows outside the fused decode (csrc/decode_layers.c `loom_silu_mul_bf16`): one pass
instead of two kernels and a temporary, ~5% of a 32-stream run's engine thread before (py-spy).
Its bf16 roundings run 16 at a time (bf16.h): 512 rows of SmolLM2's MLP, 2 threads, 254 us against
torch's 314; rounding value by value it took 466 (load ~1). On CPUs with AVX2 and no AVX-512 the
same roundings and exps run 8 at a time: 2-core AMD EPYC (Zen 3) guest, old and new in one
minute (load ~1), SiLU x up over 512 rows 2,675 -> 543 us, RoPE with the cache write 1,002 -> 142
us (32 rows: 123 -> 24), RMSNorm 98 -> 76 us.

Q8_0 matmul (csrc/q8_matmul.c): a GGUF output head stored as Q8_0 blocks, multiplied as stored
for a few rows (linear.Q8Linear): half the bytes of its bf16 copy.

Fused decode layers (csrc/decode_layers.c, csrc/int4_matmul.c): for a decode step of a few rows
of a bf16 model with int4 linears, every decoder layer in one call: the norms, the int4 matmuls
(the same codes as PyTorch's int4 op, in a layout of 16 output rows per vector; with AVX512-BF16
a lane's two codes meet the activations' bf16 pair in one dot instruction), RoPE with the cache
write, attention, SiLU and the residual adds, rounding to bf16 where the torch path does. Layer
by layer, a 1-row step here was mostly Python and dispatch around small kernels: the whole step
went 11.0-11.7 -> 7.9-9.0 ms (engine-only, alternated, load 1.0-1.3). The int4 kernel against
PyTorch's, SmolLM2's 120 linears in one process (load 1.1-1.2): 3.5 vs 3.9 ms at 1 row, 4.6 vs
6.4 at 4, 8.3-10.3 vs 11.5-13.2 at 8. On CPUs with AVX2 and no AVX-512 the codes become float32
eight lanes at a time for float32 FMAs: the 120 linears on a 2-core AMD EPYC (Zen 3) guest 8.1 ms
at 1 row, 13.9 at 4, 37.6 at 16, where the scalar loop the compiler made of it took 56.6, 184 and
861 (load ~1); a bf16 model's one-row engine step there 13.5-15.5 ms against the float32 model's
35.9-43.8.

The attention softmax and the fused layers' SiLU take their exps 16 at a time (csrc/vexp.h; at
worst 1 ulp from glibc's expf over [-103, 88], and tested against float64): a scalar expf was
~10 ns on an Intel Xeon guest, and the fused layers' SiLU ran on one thread. 30 layers of 32-row
decode attention there: 15.8-20.7 vs 21.5-23.6 ms (load not recorded); served against the commit
before, alternated three times (load 0.6-2.2): 8 streams 183-211 vs 144-183 tok/s, 32 streams
253-326 vs 255-292, one stream level.

Top-p (csrc/top_p.c): each row's tokens above a threshold, radix-sorted, instead of a `topk(256)`
over the vocabulary. 32 rows of SmolLM2's logits, 2 threads, same guest, same process as the
torch path it replaces (load not recorded): the sampled draw 2.7-2.9 ms against 4.6-13 ms, greedy's
1.1-1.7 ms.

Logprob ranks (csrc/logprob_ranks.c): the chosen token's rank and the k best tokens in one pass
per row, instead of a comparison, a sum and a `topk` over the vocabulary: 32 rows of 49,152, k=5,
2 threads, same Intel guest: 0.19 vs 2.3 ms (load 0.6).

Why C and ctypes, not a PyTorch C++ extension: the files compile in ~2 s with the system
C compiler (torch's headers take ~40 s), need no ninja, and a call releases the GIL. It links
the OpenMP runtime torch already loaded (same soname), so it runs on the engine thread's OpenMP
team like every torch kernel. Built with `-march=native` into `<cache dir>/kernels/`, keyed by the
source, compiler and CPU; without a compiler, or with `LOOM_NATIVE_KERNELS=0`, the torch path
runs instead (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from loom.models.timing import best_times, cache_dir, cpu_fingerprint, measured

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = (
    CSRC / "paged_decode.c", CSRC / "layer_ops.c", CSRC / "q8_matmul.c", CSRC / "int4_matmul.c", CSRC / "decode_layers.c",
    CSRC / "top_p.c", CSRC / "vexp.c", CSRC / "logprob_ranks.c", CSRC / "prefill_attention.c",
)  # fmt: skip
HEADERS = (CSRC / "bf16.h", CSRC / "fma_tiles.h", CSRC / "int4_matmul.h", CSRC / "vexp.h")
FLAGS = (
    "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared",
    # vectorized sums: reassociation only, no -ffast-math (gcc 12 links crtfastmath.o even into a
    # shared library, which would flush denormals to zero for the whole process)
    "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros", "-freciprocal-math",
)  # fmt: skip
MAX_HEAD_DIM, MAX_GROUP, MAX_BLOCK_SIZE = 256, 16, 64  # the kernel's stack buffers (csrc/paged_decode.c)
Q8_MAX_ROWS = 16  # activation rows per q8_0_matmul call (csrc/q8_matmul.c)
INT4_MAX_ROWS = 64  # activation rows per int4_matmul / decode_layers call (csrc/int4_matmul.h)
PREFILL_MAX_GROUP = 64  # query heads per KV head (csrc/prefill_attention.c)
LOGPROB_TOP_MAX = 64  # the most best tokens logprob_ranks returns per row (csrc/logprob_ranks.c)
INT4_TILE_ROWS = 16  # output rows per tile of the int4 kernel's weight layout
Q8_TILE_ROWS = 16  # the same for the tiled Q8_0 kernel (csrc/q8_matmul.c)
LAYER_FIELDS = 15  # pointers per layer in decode_layers' table (csrc/decode_layers.c)
BUILD_TIMEOUT_S = 120

_LIBRARY_LOCK = threading.Lock()
_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


def native_decode_supported(
    dtype: torch.dtype, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int
) -> bool:
    """Whether the kernel runs these shapes here (built now, once per process, if it must be)."""
    if dtype != torch.bfloat16 or device.type != "cpu":
        return False
    if head_dim > MAX_HEAD_DIM or block_size > MAX_BLOCK_SIZE or num_heads % num_kv_heads:
        return False
    return num_heads // num_kv_heads <= MAX_GROUP and _library() is not None


def native_prefill_supported(
    dtype: torch.dtype, device: torch.device, num_heads: int, num_kv_heads: int, head_dim: int
) -> bool:
    """Whether `prefill_attention` runs these shapes here (AVX512-BF16 builds only)."""
    if dtype != torch.bfloat16 or device.type != "cpu" or head_dim % 32 or head_dim > MAX_HEAD_DIM:
        return False
    if num_heads % num_kv_heads or num_heads // num_kv_heads > PREFILL_MAX_GROUP:
        return False
    lib = _library()
    return lib is not None and bool(lib.loom_prefill_attention_available())


def native_layer_ops_supported(dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether `rms_norm`, `rope_and_write` and `silu_mul` run here for this model."""
    return dtype == torch.bfloat16 and device.type == "cpu" and head_dim <= MAX_HEAD_DIM and _library() is not None


def native_int4_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `int4_matmul` runs here for a model in `dtype`."""
    return dtype == torch.bfloat16 and device.type == "cpu" and _library() is not None


def native_q8_supported(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `q8_0_matmul` runs here for a model in `dtype`."""
    return dtype == torch.bfloat16 and device.type == "cpu" and _library() is not None


def q8_0_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`x` `[rows, in]` bf16 (rows <= Q8_MAX_ROWS) times a Q8_0 weight (codes `[out, in]` int8,
    scales `[out, in / 32]` float16) transposed: `[rows, out]` float32."""
    lib = _library()
    assert lib is not None and codes.is_contiguous() and scales.is_contiguous()
    if x.dtype != torch.bfloat16 or x.stride(-1) != 1:
        raise ValueError("q8_0_matmul takes bf16 rows with contiguous values")
    out = torch.empty(x.shape[0], codes.shape[0], dtype=torch.float32)
    status = lib.loom_q8_0_matmul(
        x.data_ptr(), x.stride(0), x.shape[0], codes.data_ptr(), scales.data_ptr(), codes.shape[0], codes.shape[1],
        out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"q8_0 kernel refused {x.shape[0]} rows of {codes.shape[1]} (status {status})")
    return out


def native_q8_tiled_supported() -> bool:
    """Whether `q8_tiled_matmul` runs here (AVX-512 builds)."""
    lib = _library()
    return lib is not None and bool(lib.loom_q8_tiled_available())


def q8_tiles(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q8_0 weight (codes `[n, k]` int8, scales `[n, k / 32]` float16) in `q8_tiled_matmul`'s
    layout: codes `[n / 16, k, 16]`, scales as float32 `[n / 16, k / 32, 16]` (exact); n % 32 == 0."""
    n, k = codes.shape
    tcodes = codes.view(n // Q8_TILE_ROWS, Q8_TILE_ROWS, k).permute(0, 2, 1).contiguous()
    tscales = scales.float().view(n // Q8_TILE_ROWS, Q8_TILE_ROWS, k // 32).permute(0, 2, 1).contiguous()
    return tcodes, tscales


def q8_tiled_matmul(x: torch.Tensor, tcodes: torch.Tensor, tscales: torch.Tensor) -> torch.Tensor:
    """`x` `[rows, in]` bf16 (any number of rows) times a Q8_0 weight in `q8_tiles` layout: `[rows, out]` float32,
    the same values as `q8_0_matmul` up to float32 summation order."""
    lib = _library()
    assert lib is not None and x.dtype == torch.bfloat16 and x.stride(-1) == 1
    n, k = tcodes.shape[0] * Q8_TILE_ROWS, tcodes.shape[1]
    out = torch.empty(x.shape[0], n, dtype=torch.float32)
    status = lib.loom_q8_tiled_matmul(
        x.data_ptr(), x.stride(0), x.shape[0], tcodes.data_ptr(), tscales.data_ptr(), n, k, out.data_ptr()
    )
    if status != 0:
        raise ValueError(f"tiled q8_0 kernel refused {x.shape[0]} rows of {k} (status {status})")
    return out


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp as the kernels compute it (csrc/vexp.h where AVX-512 runs), for testing its accuracy."""
    lib = _library()
    assert lib is not None
    x = x.float().contiguous()
    out = torch.empty_like(x)
    lib.loom_exp_f32(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def native_top_p_supported() -> bool:
    return _library() is not None


def top_p_draw(probs: torch.Tensor, p: torch.Tensor, uniform: torch.Tensor, min_p: torch.Tensor | None) -> torch.Tensor:
    """One token id per row of `probs` `[rows, vocab]` float32: top-p, then min-p, then the draw at
    `uniform` over the kept tokens in descending probability (csrc/top_p.c); `[rows]` int64."""
    lib = _library()
    assert lib is not None and probs.dtype == torch.float32 and probs.stride(-1) == 1
    rows = probs.shape[0]
    p, uniform = p.float().contiguous(), uniform.float().contiguous()
    min_p = None if min_p is None else min_p.float().contiguous()
    out = torch.empty(rows, dtype=torch.long)
    status = lib.loom_top_p_draw(
        probs.data_ptr(), rows, probs.shape[1], probs.stride(0), p.data_ptr(), uniform.data_ptr(),
        None if min_p is None else min_p.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the top-p kernel could not allocate its scratch memory")
    return out


def native_logprobs_supported() -> bool:
    return _library() is not None


def logprob_ranks(
    logprobs: torch.Tensor, token_ids: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `logprobs` `[rows, vocab]` float32: 1 + how many tokens score strictly above
    `token_ids[row]`, and the `k` best token ids and values, best first, ties in index order
    (csrc/logprob_ranks.c); `[rows]`, `[rows, k]`, `[rows, k]`."""
    lib = _library()
    assert lib is not None and logprobs.dtype == torch.float32 and logprobs.stride(-1) == 1
    rows, vocab = logprobs.shape
    if not 0 <= k <= min(LOGPROB_TOP_MAX, vocab):
        raise ValueError(f"logprob_ranks returns 0-{min(LOGPROB_TOP_MAX, vocab)} best tokens, not {k}")
    chosen = token_ids.to(torch.long).contiguous()
    ranks = torch.empty(rows, dtype=torch.long)
    ids, values = torch.empty(rows, k, dtype=torch.long), torch.empty(rows, k, dtype=torch.float32)
    status = lib.loom_logprob_ranks(
        logprobs.data_ptr(), rows, vocab, logprobs.stride(0), chosen.data_ptr(), k, ranks.data_ptr(),
        ids.data_ptr(), values.data_ptr(),
    )  # fmt: skip
    if status != 0:
        raise IndexError(f"a chosen token id is outside the vocabulary of {vocab}")
    return ranks, ids, values


def int4_tiles(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """The int4 kernel's weight layout (csrc/int4_matmul.c) from codes `[n, k]` (0..15) and bf16
    scales and zeros `[n, k / 32]` (w = (code - 8) * scale + zero); n % 16 == 0, k % 32 == 0."""
    n, k = codes.shape
    pairs = codes.view(n // INT4_TILE_ROWS, INT4_TILE_ROWS, k // 2, 2)  # [tile, lane, pair, 2]
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 1).contiguous()  # [tile, pair, lane]

    def per_tile(t: torch.Tensor) -> torch.Tensor:  # [n, k / 32] -> [tile, k / 32, lane]
        return t.view(n // INT4_TILE_ROWS, INT4_TILE_ROWS, -1).permute(0, 2, 1).contiguous()

    return {"tcodes": packed, "tscales": per_tile(scales), "tzeros": per_tile(zeros)}


def int4_matmul(x: torch.Tensor, tcodes: torch.Tensor, tscales: torch.Tensor, tzeros: torch.Tensor) -> torch.Tensor:
    """`x` `[rows, k]` bf16 (rows <= INT4_MAX_ROWS) times an int4 weight in `int4_tiles` layout: `[rows, n]` bf16."""
    lib = _library()
    assert lib is not None and x.dtype == torch.bfloat16 and x.stride(-1) == 1
    n, k = tcodes.shape[0] * INT4_TILE_ROWS, tcodes.shape[1] * 2
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    status = lib.loom_int4_matmul(
        x.data_ptr(), x.stride(0), x.shape[0], tcodes.data_ptr(), tscales.data_ptr(), tzeros.data_ptr(), n, k,
        out.data_ptr(), out.stride(0),
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"int4 kernel refused {x.shape[0]} rows of {k} (status {status})")
    return out


def choose_int4_kernel() -> None:
    """Sets, for the process, whether the int4 kernel multiplies in float32 FMAs or bf16 dot
    instructions on this CPU. Timed once per machine (`timing.measured`) where the build has both.

    Neither wins everywhere: an Intel AVX512-BF16 guest without AMX runs the dot at half the FMA's
    rate (SmolLM2's 120 linears at 8 rows: 8.4 vs 15.2 ms, at 32 rows 32.5 vs 60.8; load 0.3-0.9),
    where an AMD Zen 4 runs it at twice the rate.
    """
    lib = _library()
    if lib is not None and lib.loom_int4_has_dot():
        lib.loom_int4_use_fma(int(measured("int4 kernel: float32 FMAs beat bf16 dots at 8 rows", _time_int4_fma)))


def _time_int4_fma() -> bool:
    lib = _library()
    assert lib is not None
    gen = torch.Generator().manual_seed(0)
    n, k = 3072, 576
    scales = (torch.rand(n, k // 32, generator=gen) * 0.02).to(torch.bfloat16)
    tiles = int4_tiles(torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8), scales, scales)
    x = torch.randn(8, k, generator=gen).to(torch.bfloat16)

    def run(use_fma: int) -> None:
        lib.loom_int4_use_fma(use_fma)
        for _ in range(4):
            int4_matmul(x, tiles["tcodes"], tiles["tscales"], tiles["tzeros"])

    dot, fma = best_times([lambda: run(0), lambda: run(1)], 5)
    return fma < dot


def decode_layers(
    hidden: torch.Tensor,  # [rows, hidden] bf16, contiguous: updated in place
    layers: torch.Tensor,  # [num_layers, LAYER_FIELDS] int64 pointers (csrc/decode_layers.c)
    shape: tuple[int, int, int, int, float],  # num_heads, num_kv_heads, head_dim, intermediate, rms eps
    cos: torch.Tensor,  # [rows, 1, hd] (RotaryEmbedding.tables)
    signed_sin: torch.Tensor,
    slots: torch.Tensor,  # [rows] int64
    num_slots: int,
    block_table: torch.Tensor,  # [rows, max_blocks] int32
    context_lens: torch.Tensor,  # [rows] int32
    block_size: int,
) -> None:
    """Every decoder layer of a decode step for `rows` <= INT4_MAX_ROWS decode tokens in one call."""
    lib = _library()
    assert lib is not None and hidden.is_contiguous() and cos.is_contiguous() and signed_sin.is_contiguous()
    num_heads, num_kv_heads, head_dim, intermediate, eps = shape
    status = lib.loom_decode_layers(
        hidden.data_ptr(), hidden.shape[0], layers.data_ptr(), layers.shape[0], hidden.shape[1], num_heads,
        num_kv_heads, head_dim, intermediate, cos.data_ptr(), signed_sin.data_ptr(), slots.data_ptr(), num_slots,
        block_table.data_ptr(), block_table.shape[1], context_lens.data_ptr(), block_size, eps, head_dim**-0.5,
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"the decode-layers kernel refused {hidden.shape[0]} rows (status {status})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dim of `x` `[rows, dim]` bf16, into a new tensor."""
    lib = _library()
    assert lib is not None and weight.is_contiguous()
    x = x.contiguous()
    out = torch.empty_like(x)
    lib.loom_rms_norm_bf16(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`F.silu(gate) * up` for `gate_up` `[rows, 2 * intermediate]` bf16 (gate | up), into a new tensor."""
    lib = _library()
    assert lib is not None and gate_up.dtype == torch.bfloat16
    gate_up = gate_up.contiguous()
    rows, intermediate = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, intermediate, dtype=gate_up.dtype)
    lib.loom_silu_mul_bf16(gate_up.data_ptr(), rows, intermediate, out.data_ptr())
    return out


def rope_and_write(
    qkv: torch.Tensor,  # [T, heads + 2*kv_heads, hd] bf16, rows contiguous
    cos: torch.Tensor,  # [T, 1, hd] (RotaryEmbedding.tables)
    signed_sin: torch.Tensor,
    num_heads: int,
    kv_cache: torch.Tensor,  # [2*kv_heads, slots, hd]
    slots: torch.Tensor,  # [T] int64
) -> None:
    """Rotates the q and k heads of `qkv` in place and writes each token's k and v heads at its slot."""
    lib = _library()
    assert lib is not None and qkv.stride(2) == 1 and qkv.stride(1) == qkv.shape[2]
    assert cos.is_contiguous() and signed_sin.is_contiguous() and slots.dtype == torch.long and slots.is_contiguous()
    rows, _, head_dim = qkv.shape
    lib.loom_rope_write_bf16(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), signed_sin.data_ptr(), rows, num_heads,
        kv_cache.shape[0] // 2, head_dim, kv_cache.data_ptr(), kv_cache.shape[1], slots.data_ptr(),
    )  # fmt: skip


def paged_decode(
    q: torch.Tensor,  # [D, heads, hd] bf16; rows may be strided (a view of the fused projection)
    kv_cache: torch.Tensor,  # [2*kv_heads, slots, hd] bf16, contiguous
    block_table: torch.Tensor,  # [D, max_blocks] int32, contiguous
    context_lens: torch.Tensor,  # [D] int32, each >= 1
    block_size: int,
) -> torch.Tensor:  # [D, heads, hd]
    lib = _library()
    assert lib is not None, "check native_decode_supported first"
    q = _bf16_queries(q, kv_cache, "decode")
    num_reqs, num_heads, head_dim = q.shape
    out = torch.empty(num_reqs, num_heads, head_dim, dtype=q.dtype)
    status = lib.loom_paged_decode_bf16(
        kv_cache.data_ptr(), kv_cache.shape[1], q.data_ptr(), q.stride(0), out.data_ptr(),
        block_table.data_ptr(), block_table.shape[1], context_lens.data_ptr(),
        num_reqs, num_heads, kv_cache.shape[0] // 2, head_dim, block_size, head_dim**-0.5,
    )  # fmt: skip
    if status != 0:
        raise ValueError(f"paged decode kernel refused {num_heads}/{kv_cache.shape[0] // 2} heads of {head_dim}")
    return out


def prefill_attention(
    q: torch.Tensor,  # [Q, heads, hd] bf16; rows may be strided (a view of the fused projection)
    kv_cache: torch.Tensor,  # [2*kv_heads, slots, hd] bf16, contiguous
    context_slots: torch.Tensor,  # [C] int64: every context token's slot in order, the chunk's own last
) -> torch.Tensor:  # [Q, heads, hd]
    """Causal attention of a chunk's queries, query i at context position C - Q + i (csrc/prefill_attention.c)."""
    lib = _library()
    assert lib is not None, "check native_prefill_supported first"
    q = _bf16_queries(q, kv_cache, "prefill")
    num_q, num_heads, head_dim = q.shape
    slots = context_slots.to(torch.long).contiguous()
    out = torch.empty(num_q, num_heads, head_dim, dtype=q.dtype)
    status = lib.loom_prefill_attention_bf16(
        kv_cache.data_ptr(), kv_cache.shape[1], slots.data_ptr(), slots.shape[0], q.data_ptr(), q.stride(0), num_q,
        out.data_ptr(), num_heads, kv_cache.shape[0] // 2, head_dim, head_dim**-0.5,
    )  # fmt: skip
    if status != 0:
        raise ValueError(
            f"prefill kernel refused {num_q} queries over {slots.shape[0]} keys, {num_heads} heads of {head_dim}"
        )
    return out


def _bf16_queries(q: torch.Tensor, kv_cache: torch.Tensor, kernel: str) -> torch.Tensor:
    """`q` `[rows, heads, hd]` as the attention kernels read it: bf16 over a bf16 cache, each row's
    heads contiguous (rows may be strided: a view of the fused projection)."""
    if q.dtype != torch.bfloat16 or kv_cache.dtype != torch.bfloat16:
        raise ValueError(f"the native {kernel} kernel reads bf16, not {q.dtype} queries over a {kv_cache.dtype} cache")
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def _library() -> ctypes.CDLL | None:
    # the model's linears are built on a thread pool, and each asks: one build, not one per thread
    with _LIBRARY_LOCK:
        return _load_library()


@functools.cache
def _load_library() -> ctypes.CDLL | None:
    if _turned_off():
        log.info("LOOM_NATIVE_KERNELS=0: every kernel runs on the torch path")
        return None
    try:
        root = cache_dir()
        if root is not None:
            lib = ctypes.CDLL(str(_built_library(root / "kernels")))
        else:  # nothing kept: built for this process alone; the loaded library outlives its file
            with tempfile.TemporaryDirectory(prefix="loom-kernels-") as folder:
                lib = ctypes.CDLL(str(_built_library(Path(folder))))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("no native kernels (%s); every kernel runs on the torch path", exc)
        return None
    lib.loom_paged_decode_bf16.restype = ctypes.c_int
    lib.loom_paged_decode_bf16.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _PTR] + [_I64] * 5 + [_F32]
    lib.loom_rms_norm_bf16.restype = None
    lib.loom_rms_norm_bf16.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _F32]
    lib.loom_rope_write_bf16.restype = None
    lib.loom_rope_write_bf16.argtypes = [_PTR, _I64, _PTR, _PTR] + [_I64] * 4 + [_PTR, _I64, _PTR]
    lib.loom_q8_0_matmul.restype = ctypes.c_int
    lib.loom_q8_0_matmul.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]
    lib.loom_q8_tiled_available.restype = ctypes.c_int
    lib.loom_q8_tiled_available.argtypes = []
    lib.loom_q8_tiled_matmul.restype = ctypes.c_int
    lib.loom_q8_tiled_matmul.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR]
    lib.loom_int4_matmul.restype = ctypes.c_int
    lib.loom_int4_matmul.argtypes = [_PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _I64]
    lib.loom_int4_use_fma.restype = None
    lib.loom_int4_use_fma.argtypes = [ctypes.c_int]
    lib.loom_int4_has_dot.restype = ctypes.c_int
    lib.loom_int4_has_dot.argtypes = []
    lib.loom_exp_f32.restype = None
    lib.loom_exp_f32.argtypes = [_PTR, _PTR, _I64]
    lib.loom_top_p_draw.restype = ctypes.c_int
    lib.loom_top_p_draw.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR]
    lib.loom_logprob_ranks.restype = ctypes.c_int
    lib.loom_logprob_ranks.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR]
    lib.loom_silu_mul_bf16.restype = None
    lib.loom_silu_mul_bf16.argtypes = [_PTR, _I64, _I64, _PTR]
    lib.loom_prefill_attention_available.restype = ctypes.c_int
    lib.loom_prefill_attention_available.argtypes = []
    lib.loom_prefill_attention_bf16.restype = ctypes.c_int
    lib.loom_prefill_attention_bf16.argtypes = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _F32]
    lib.loom_decode_layers.restype = ctypes.c_int
    lib.loom_decode_layers.argtypes = (
        [_PTR, _I64, _PTR] + [_I64] * 6 + [_PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR, _I64, _F32, _F32]
    )
    return lib


def native_kernels_expected() -> bool:
    """Whether the kernels will build here (not turned off, a C compiler on PATH), known without building them."""
    return not _turned_off() and _compiler() is not None


def _turned_off() -> bool:
    return os.environ.get("LOOM_NATIVE_KERNELS", "1") == "0"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _built_library(folder: Path) -> Path:
    """The compiled kernel for this source, compiler and CPU: from `folder`, else built there now."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.blake2b(
        "\n".join(
            [*(src.read_text() for src in (*SOURCES, *HEADERS)), compiler, version, " ".join(FLAGS), cpu_fingerprint()]
        ).encode(),
        digest_size=8,
    ).hexdigest()
    target = folder / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    cmd = [compiler, *FLAGS, *map(str, SOURCES), "-o", str(tmp), "-lm"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
    os.replace(tmp, target)  # another process building the same key writes the same bytes
    log.info("built the native kernels: %s", target)
    return target
