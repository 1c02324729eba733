"""The int4 decode kernel and the fused decode layers (native.int4_matmul, native.decode_layers):
the same values as the weight they read and as the layer-by-layer path, up to float32 summation
order; a row's result is its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from loom.models import llama, native
from loom.models.attention import AttentionMetadata, DecodeBlocks, PrefillSpan
from loom.models.config import ModelConfig
from loom.models.linear import quantize_q4
from loom.models.llama import LlamaModel
from loom.models.loader import llama_tensor_shapes
from loom.models.native import INT4_MAX_ROWS, int4_matmul, int4_tiles, native_layer_ops_supported
from loom.models.prepared import prepare_llama_weights

pytestmark = pytest.mark.skipif(
    not native_layer_ops_supported(torch.bfloat16, torch.device("cpu"), 16), reason="no C compiler"
)

CONFIG = ModelConfig(
    architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
    num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=256,
    tie_word_embeddings=True,
)  # fmt: skip
BLOCK = 16


def _tiled(n: int, k: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A random int4 weight in the kernel's layout, and its values as float64."""
    groups = quantize_q4(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    scales = groups.scales.to(torch.bfloat16)
    zeros = (groups.offsets + 8 * groups.scales).to(torch.bfloat16)
    centred = groups.codes.view(n, -1, 32).double() - 8
    values = (centred * scales.double().unsqueeze(-1) + zeros.double().unsqueeze(-1)).view(n, k)
    return int4_tiles(groups.codes, scales, zeros), values


@pytest.fixture(params=["bf16 dots", "float32 FMAs"])
def int4_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each of the kernel's two ways to multiply (one way where the CPU lacks bf16 dot instructions)."""
    lib = native._library()
    assert lib is not None
    if request.param == "bf16 dots" and not lib.loom_int4_has_dot():
        pytest.skip("no bf16 dot instructions on this CPU")
    lib.loom_int4_use_fma(int(request.param == "float32 FMAs"))
    yield request.param
    native.choose_int4_kernel()


@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 13, 27, INT4_MAX_ROWS])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (960, 576)])
def test_the_int4_kernel_computes_the_weights_values(rows: int, n: int, k: int, int4_path: str) -> None:
    tiles, values = _tiled(n, k, seed=n + rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    got = int4_matmul(x, tiles["tcodes"], tiles["tscales"], tiles["tzeros"])
    exact = x.double() @ values.t()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # rounded once to bf16 (2^-8 relative), from float32 sums of terms as large as |x| . |w|
    bound = exact.abs() * 2**-8 + (x.double().abs() @ values.abs().t()) * 1e-5
    assert bool(((got.double() - exact).abs() <= bound).all())


def test_an_int4_rows_result_does_not_depend_on_the_other_rows(int4_path: str) -> None:
    tiles, _ = _tiled(96, 128, seed=1)
    x = torch.randn(INT4_MAX_ROWS, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    together = int4_matmul(x, tiles["tcodes"], tiles["tscales"], tiles["tzeros"])
    for r in (0, 5, 9, INT4_MAX_ROWS - 1):
        alone = int4_matmul(x[r : r + 1], tiles["tcodes"], tiles["tscales"], tiles["tzeros"])
        assert torch.equal(alone[0], together[r])


def test_the_int4_kernel_refuses_more_rows_than_it_takes() -> None:
    tiles, _ = _tiled(16, 32, seed=3)
    with pytest.raises(ValueError, match="refused"):
        int4_matmul(torch.zeros(INT4_MAX_ROWS + 1, 32, dtype=torch.bfloat16), *tiles.values())


def _model() -> LlamaModel:
    gen = torch.Generator().manual_seed(0)
    sources = {
        name: (1 + 0.1 * torch.randn(shape, generator=gen)) if len(shape) == 1 else 0.3 * torch.randn(shape, generator=gen)
        for name, shape in llama_tensor_shapes(CONFIG).items()
    }  # fmt: skip
    weights = prepare_llama_weights(CONFIG, sources, "int4", torch.bfloat16)
    return LlamaModel(CONFIG, torch.bfloat16, weights, max_small_batch_rows=INT4_MAX_ROWS).eval()


def _decode_step(
    model: LlamaModel, prompts: list[list[int]], next_ids: list[int], newcomer: list[int] | None = None
) -> tuple[torch.Tensor, list]:
    """Prefills each prompt in its own blocks, then one decode step of every request (with
    `newcomer`'s whole prompt prefilled in the same step): its logits and the caches."""
    blocks_per_req = 4
    num_slots = (len(prompts) + 1) * blocks_per_req * BLOCK
    kv = [
        torch.zeros(2 * CONFIG.num_kv_heads, num_slots, CONFIG.head_dim, dtype=torch.bfloat16)
        for _ in range(CONFIG.num_layers)
    ]
    table = torch.arange(len(prompts) * blocks_per_req).view(len(prompts), blocks_per_req).flip(0)  # not in order

    def slots(r: int, pos: torch.Tensor) -> torch.Tensor:
        return table[r, pos // BLOCK] * BLOCK + pos % BLOCK

    with torch.inference_mode():
        for r, ids in enumerate(prompts):
            pos = torch.arange(len(ids))
            meta = AttentionMetadata(slots(r, pos), BLOCK, 0, None, (PrefillSpan(0, len(ids), slots(r, pos), True),))
            model(torch.tensor(ids), pos, kv, meta, torch.tensor([len(ids) - 1]))
        pos = torch.tensor([len(p) for p in prompts])
        step_slots = torch.stack([slots(r, pos[r]) for r in range(len(prompts))])
        ctx = DecodeBlocks(table.to(torch.int32), (pos + 1).to(torch.int32))
        ids, spans, rows = torch.tensor(next_ids), (), torch.arange(len(prompts))
        if newcomer is not None:  # in the blocks after every other request's
            n, d = len(newcomer), len(prompts)
            new_slots = len(prompts) * blocks_per_req * BLOCK + torch.arange(n)
            spans = (PrefillSpan(d, d + n, new_slots, True),)
            ids, pos = torch.cat([ids, torch.tensor(newcomer)]), torch.cat([pos, torch.arange(n)])
            step_slots, rows = torch.cat([step_slots, new_slots]), torch.cat([rows, torch.tensor([d + n - 1])])
        meta = AttentionMetadata(step_slots, BLOCK, len(prompts), ctx, spans)
        logits = model(ids, pos, kv, meta, rows)
    return logits, kv


@pytest.mark.parametrize("num_reqs", [1, 5])
def test_the_fused_decode_layers_give_what_the_layer_by_layer_path_gives(
    num_reqs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    gen = torch.Generator().manual_seed(num_reqs)
    prompts = [
        torch.randint(0, 96, (int(n),), generator=gen).tolist()
        for n in torch.randint(3, 40, (num_reqs,), generator=gen)
    ]
    next_ids = torch.randint(0, 96, (num_reqs,), generator=gen).tolist()
    calls: list[int] = []
    fused_call = llama.decode_layers
    monkeypatch.setattr(
        llama, "decode_layers", lambda hidden, *a: calls.append(hidden.shape[0]) or fused_call(hidden, *a)
    )
    fused, fused_kv = _decode_step(model, prompts, next_ids)
    assert calls == [num_reqs]
    model._layer_table = None  # the layer-by-layer path (native norms, RoPE and attention)
    stepwise, stepwise_kv = _decode_step(model, prompts, next_ids)
    assert calls == [num_reqs]
    # the same operations and roundings; int4 sums in another order tip a bf16 rounding now and then
    assert float((fused - stepwise).abs().max()) <= 0.02 * float(stepwise.abs().max())
    assert torch.equal(fused.argmax(-1), stepwise.argmax(-1))
    for a, b in zip(fused_kv, stepwise_kv, strict=True):
        assert float((a.float() - b.float()).abs().max()) <= 0.02 * float(b.float().abs().max())


def test_decode_rows_give_the_same_bits_with_or_without_a_prefill_in_their_step() -> None:
    model = _model()
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (7, 21)]
    newcomer = torch.randint(0, 96, (30,), generator=gen).tolist()
    next_ids = [5, 17]
    alone, _ = _decode_step(model, prompts, next_ids)
    shared, _ = _decode_step(model, prompts, next_ids, newcomer)
    assert torch.equal(shared[: len(prompts)], alone)
    assert shared.shape[0] == len(prompts) + 1  # the newcomer's last prompt token was sampled too
