"""The native layer steps give what the torch path gives: RMSNorm with F.rms_norm's roundings, and
RoPE plus the cache write as `RotaryEmbedding.apply_` and `index_copy_` do them, the MLP's
activation as `F.silu(gate) * up`; the library is
built once per machine, and without a working compiler everything runs on the torch path."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from loom.models import native, timing
from loom.models.llama import RotaryEmbedding
from loom.models.native import native_layer_ops_supported, rms_norm, rope_and_write, silu_mul

pytestmark = pytest.mark.skipif(
    not native_layer_ops_supported(torch.bfloat16, torch.device("cpu"), 64), reason="no C compiler"
)


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_rms_norm_matches_the_torch_path(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 576, generator=gen) * 30).to(torch.bfloat16)
    x[0, 3] = 900.0  # the residual stream's few huge activations
    weight = (torch.rand(576, generator=gen) + 0.5).to(torch.bfloat16)
    ours, theirs = rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5)
    # the same roundings: at most one bf16 step apart where float32 sums in another order tip one
    diff = (ours.float() - theirs.float()).abs()
    assert bool((diff <= theirs.float().abs() * 2**-7 + 1e-6).all())
    assert float((ours != theirs).float().mean()) < 0.01


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_silu_mul_matches_the_torch_path(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * 1536, generator=gen) * 4).to(torch.bfloat16)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's ends and zero
    gate, up = gate_up.split(1536, dim=-1)
    ours, theirs = silu_mul(gate_up), F.silu(gate) * up
    # the same two roundings; another exp can tip one bf16 step where a value sits on a boundary
    diff = (ours.float() - theirs.float()).abs()
    assert bool((diff <= theirs.float().abs() * 2**-7 + 1e-30).all())
    assert float((ours != theirs).float().mean()) < 0.01


def test_silu_mul_rounds_as_torch_rounds() -> None:
    """Where exp(-gate) vanishes, silu(gate) is gate, so only the two bf16 roundings are left: bit
    for bit, ties to even and NaN included."""
    gen = torch.Generator().manual_seed(0)
    gate = (torch.rand(3, 1536, generator=gen) * 80 + 20).to(torch.bfloat16)
    up = torch.randn(3, 1536, generator=gen).to(torch.bfloat16)
    up[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    ours, theirs = silu_mul(torch.cat([gate, up], dim=1)), F.silu(gate) * up
    assert torch.equal(ours.isnan(), theirs.isnan())
    assert torch.equal(ours.nan_to_num(0.0), theirs.nan_to_num(0.0))


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (8, 2, 32)])
def test_rope_and_cache_write_match_the_torch_path(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    rows, num_slots = 13, 64
    rope = RotaryEmbedding(head_dim, 10000.0, 256, torch.bfloat16)
    positions = torch.randint(0, 256, (rows,), generator=gen)
    cos, sin = rope.tables(positions)
    slots = torch.randperm(num_slots, generator=gen)[:rows]
    qkv = torch.randn(rows, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(torch.bfloat16)
    cache = torch.zeros(2 * num_kv_heads, num_slots, head_dim, dtype=torch.bfloat16)

    expected_qkv, expected_cache = qkv.clone(), cache.clone()
    rope.apply_(expected_qkv[:, : num_heads + num_kv_heads], cos, sin)
    expected_cache.index_copy_(1, slots, expected_qkv[:, num_heads:].transpose(0, 1))

    rope_and_write(qkv, cos, sin, num_heads, cache, slots)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(cache, expected_cache)


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """`native._library` is built once per process: forget it around the test, and after."""
    native._load_library.cache_clear()
    yield
    native._load_library.cache_clear()
    timing.keep_choices(None)


def test_the_kernels_exp_is_within_two_ulp_of_the_exact_value() -> None:
    """The attention softmax's and the fused SiLU's exp (csrc/vexp.h): against float64, over the
    whole range where float32 exp is a normal number, plus the ends."""
    x = torch.cat([torch.linspace(-87.0, 88.0, 200_003), torch.tensor([0.0, -1e-30, 1e-30, -0.5, 0.5])])
    got = native.exp_f32(x)
    exact = x.double().exp()
    ulp = torch.finfo(torch.float32).eps * exact.abs()  # at most 2x the true ulp: a safe bound
    assert bool(((got.double() - exact).abs() <= 2 * ulp).all())
    ends = native.exp_f32(torch.tensor([-200.0, -110.0, 89.0]))
    assert ends[0] == 0 and ends[1] == 0 and bool(torch.isfinite(ends[2]) | torch.isinf(ends[2]))


@pytest.mark.parametrize("compiler", ["/nonexistent/cc", "false"])  # missing, and one that fails
def test_without_a_working_compiler_every_step_runs_on_the_torch_path(
    compiler: str, fresh_library: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", compiler)
    cpu = torch.device("cpu")
    assert not native.native_decode_supported(torch.bfloat16, cpu, 9, 3, 64, 16)
    assert not native_layer_ops_supported(torch.bfloat16, cpu, 64)
    assert "every kernel runs on the torch path" in caplog.text


def test_loom_native_kernels_0_turns_them_off(fresh_library: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_NATIVE_KERNELS", "0")
    assert not native_layer_ops_supported(torch.bfloat16, torch.device("cpu"), 64)


def test_the_library_is_built_once_into_the_cache_directory(fresh_library: None, tmp_path: Path) -> None:
    timing.keep_choices(tmp_path)
    assert native_layer_ops_supported(torch.bfloat16, torch.device("cpu"), 64)
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._load_library.cache_clear()  # a new process, as far as the library goes
    assert native_layer_ops_supported(torch.bfloat16, torch.device("cpu"), 64)
    assert list((tmp_path / "kernels").glob("cpu_kernels-*.so")) == built and built[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("arch", ["x86-64", "x86-64-v3", "skylake-avx512"])  # no AVX; AVX2 + F16C; AVX-512 without bf16
def test_the_library_builds_and_loads_for_cpus_without_this_ones_features(arch: str, tmp_path: Path) -> None:
    """Each kernel's portable paths compile cleanly and link: a missing header there once left
    an undefined symbol, and a library that does not load turns every kernel off."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 targets")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert compiler is not None
    flags = [f for f in native.FLAGS if f != "-march=native"]
    target = tmp_path / f"kernels-{arch}.so"
    cmd = [
        compiler,
        *flags,
        f"-march={arch}",
        "-Werror=implicit-function-declaration",
        *map(str, native.SOURCES),
        "-o",
        str(target),
        "-lm",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(target))
    for name in (
        "loom_paged_decode_bf16",
        "loom_rms_norm_bf16",
        "loom_q8_0_matmul",
        "loom_int4_matmul",
        "loom_decode_layers",
    ):
        assert hasattr(lib, name)
