"""Quantized linears on the default model keep the output quality of the unquantized bf16 model.

Reference: the float32 model's 64 greedy tokens after each of five chat prompts. Each variant is
teacher-forced along those tokens the way a server computes them (each prompt one prefill, then
all five continuations as decode rows of one step each, so the quantized kernels do the decoding)
and scored by how often its top-1 token is the reference's and by the mean KL divergence from the
reference's distribution. `auto` (int4 from the file's Q4_1 blocks) must score as well as the
unquantized bf16 model: better in a float32 model, within noise in a bf16 one. int8 (requantized
from Q4_1) is measured for the record. Free-running greedy runs diverge after the first near-tie,
so they are not what is asserted (the issue notes have them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from loom.engine.core import EngineCore
from loom.engine.kv_cache import KVCacheManager
from loom.engine.request import EngineRequest
from loom.engine.runner import ModelRunner
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig
from loom.models.attention import AttentionMetadata, DecodeBlocks, DecodeGather, PrefillSpan, zeroed_kv_cache
from loom.models.config import ModelConfig
from loom.models.gguf_blocks import Blocks
from loom.models.linear import Q8Linear, RowSwitchLinear
from loom.models.llama import LlamaModel
from loom.models.loader import load_sources
from loom.models.native import native_decode_supported, native_q8_supported
from loom.models.prepared import PreparedWeights, prepare_llama_weights
from loom.tokenizer import load_tokenizer

NUM_NEW_TOKENS = 64
BLOCK_SIZE = 16
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "List three prime numbers and explain why each is prime.",
    "Tell me a story about a dragon who loves tea.",
]

Sources = tuple[ModelConfig, dict[str, torch.Tensor | Blocks]]


@dataclass(frozen=True, slots=True)
class Score:
    top1: float  # share of positions whose argmax is the reference token
    kl: float  # mean KL(reference || variant) in nats

    def __str__(self) -> str:
        return f"top-1 {self.top1:.3f}, KL {self.kl:.4f}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread: None) -> None:
    """See tests/conftest.py."""


@pytest.fixture(scope="module")
def prompts(model_path: Path) -> list[list[int]]:
    tok = load_tokenizer(model_path)
    chats = [[{"role": "user", "content": text}] for text in PROMPTS]
    return [tok.encode(tok.hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False)) for c in chats]


@pytest.fixture(scope="module")
def sources(model_path: Path) -> Sources:
    return load_sources(model_path, torch.float32, keep_blocks=True)


@pytest.fixture(scope="module")
def build(sources: Sources) -> Callable[[torch.dtype, str], LlamaModel]:
    config, tensors = sources

    def build(dtype: torch.dtype, quantization: str) -> LlamaModel:
        weights = prepare_llama_weights(config, dict(tensors), quantization, dtype)
        return LlamaModel(config, dtype, weights).eval()

    return build


def _served_logprobs(
    model: LlamaModel, dtype: torch.dtype, prompts: list[list[int]], tokens: list[list[int]], native: bool = False
) -> list[torch.Tensor]:
    """Per prompt `[len(tokens), vocab]` log-probabilities of each next token, teacher-forced along
    `tokens`; decode attention on the torch path, or with `native` in the native kernel."""
    cfg, num_reqs = model.config, len(prompts)
    blocks_per_req = -(-max(len(p) + len(t) for p, t in zip(prompts, tokens, strict=True)) // BLOCK_SIZE)
    num_blocks = num_reqs * blocks_per_req
    shape = (2 * cfg.num_kv_heads, num_blocks * BLOCK_SIZE, cfg.head_dim)
    kv = [zeroed_kv_cache(shape, dtype) for _ in range(cfg.num_layers)]
    table = torch.arange(num_blocks).view(num_reqs, blocks_per_req)  # request r owns row r's blocks

    def slots(req: int, positions: torch.Tensor) -> torch.Tensor:
        return table[req, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE

    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    for r, ids in enumerate(prompts):  # the prompt's last position predicts the first token
        pos = torch.arange(len(ids))
        span = PrefillSpan(0, len(ids), slots(r, pos), is_first_chunk=True)
        meta = AttentionMetadata(slots(r, pos), BLOCK_SIZE, 0, None, (span,))
        rows[r].append(model(torch.tensor(ids), pos, kv, meta, torch.tensor([len(ids) - 1]))[0])
    gather = ((torch.arange(shape[0]) * num_blocks).unsqueeze(1) + table.reshape(1, -1)).reshape(-1)
    for step in range(len(tokens[0]) - 1):
        pos = torch.tensor([len(p) + step for p in prompts])
        valid = torch.arange(blocks_per_req * BLOCK_SIZE).unsqueeze(0) <= pos.unsqueeze(1)
        mask = torch.zeros(num_reqs, 1, valid.shape[1], dtype=dtype).masked_fill_(~valid.unsqueeze(1), float("-inf"))
        step_slots = torch.stack([slots(r, pos[r]) for r in range(num_reqs)])
        ctx: DecodeBlocks | DecodeGather = (
            DecodeBlocks(table.to(torch.int32), (pos + 1).to(torch.int32)) if native else DecodeGather(gather, mask)
        )
        meta = AttentionMetadata(step_slots, BLOCK_SIZE, num_reqs, ctx, ())
        logits = model(torch.tensor([t[step] for t in tokens]), pos, kv, meta, torch.arange(num_reqs))
        for r in range(num_reqs):
            rows[r].append(logits[r])
    return [torch.stack(r).log_softmax(-1) for r in rows]


def _greedy(model: LlamaModel, prompts: list[list[int]]) -> list[list[int]]:
    """Every prompt's NUM_NEW_TOKENS greedy tokens, run batched through the engine core."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), KVCacheManager(96, 16))
    core = EngineCore(sched, ModelRunner(model, 96, 16, torch.float32), eos_token_id=None)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add_request(EngineRequest(str(i), tuple(ids), params))
    tokens: list[list[int]] = [[] for _ in prompts]
    while core.has_work:
        for out in core.step():
            tokens[int(out.req_id)].extend(out.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def reference(
    build: Callable[[torch.dtype, str], LlamaModel], prompts: list[list[int]]
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The float32 model's greedy tokens per prompt, and its log-probabilities along them."""
    model = build(torch.float32, "none")
    tokens = _greedy(model, prompts)
    logprobs = _served_logprobs(model, torch.float32, prompts, tokens)
    for t, lp in zip(tokens, logprobs, strict=True):
        assert lp.argmax(-1).tolist() == t  # the harness computes what the engine did
    return tokens, logprobs


def _score(
    model: LlamaModel,
    dtype: torch.dtype,
    prompts: list[list[int]],
    reference: tuple[list[list[int]], list],
    native: bool = False,
) -> Score:
    tokens, ref_logprobs = reference
    logprobs = torch.cat(_served_logprobs(model, dtype, prompts, tokens, native))
    ref = torch.cat(ref_logprobs)
    top1 = float((logprobs.argmax(-1) == torch.tensor(sum(tokens, []))).float().mean())
    kl = float((ref.exp() * (ref - logprobs.float())).sum(-1).mean())
    return Score(top1, kl)


def test_int4_from_q4_1_scores_as_well_as_the_unquantized_bf16_model(
    build: Callable[[torch.dtype, str], LlamaModel],
    prompts: list[list[int]],
    reference: tuple[list[list[int]], list[torch.Tensor]],
) -> None:
    variants = [(torch.bfloat16, "none"), (torch.bfloat16, "int4"), (torch.float32, "int4"), (torch.bfloat16, "int8")]
    scores = {(d, q): _score(build(d, q), d, prompts, reference) for d, q in variants}
    report = "; ".join(f"{str(d).removeprefix('torch.')} {q}: {s}" for (d, q), s in scores.items())
    print(report)  # shown with `pytest -s`: the numbers behind the default
    baseline = scores[(torch.bfloat16, "none")]
    assert baseline.top1 > 0.9, report  # the harness itself: bf16 mostly agrees with float32
    # float32 activations around int4 linears: closer to the reference than bf16 is, by KL. Top-1
    # only within noise: where bf16 is not native, "bf16 none" multiplies in float32 and flipped 3
    # fewer near-ties than float32 int4 on a 2-core AMD AVX2 guest (0.994 vs 0.984, KL 0.0006 vs 0.0003)
    assert scores[(torch.float32, "int4")].top1 >= baseline.top1 - 0.03, report
    assert scores[(torch.float32, "int4")].kl <= baseline.kl, report
    # a bf16 model's int4: within noise of bf16 (320 positions: 0.03 is 10 tokens). Near-ties flip
    # top-1 either way: 7 tokens fewer on an Intel AMX guest (KL 0.0010 vs 0.0009), fewer than 6 on
    # an AMD EPYC one; the KL bound below is the steadier measure
    assert scores[(torch.bfloat16, "int4")].top1 >= baseline.top1 - 0.03, report
    assert scores[(torch.bfloat16, "int4")].kl <= 1.5 * baseline.kl, report


@pytest.mark.skipif(
    not native_decode_supported(torch.bfloat16, torch.device("cpu"), 9, 3, 64, BLOCK_SIZE), reason="no C compiler"
)
def test_native_decode_attention_scores_as_well_as_the_torch_path(
    build: Callable[[torch.dtype, str], LlamaModel],
    prompts: list[list[int]],
    reference: tuple[list[list[int]], list[torch.Tensor]],
) -> None:
    """The served default (bf16, int4) with decode attention in the native kernel (float32 inside)
    against the torch path (bf16 scores): at least as close to the float32 model."""
    model = build(torch.bfloat16, "int4")
    torch_path = _score(model, torch.bfloat16, prompts, reference)
    native = _score(model, torch.bfloat16, prompts, reference, native=True)
    report = f"torch path: {torch_path}; native: {native}"
    print(report)
    # near-ties flip top-1 either way: 0.969-0.975 native against 0.972-0.981 on the torch path over
    # three runs on an AMD EPYC guest (the small-batch kernel choice is timed per process), KL
    # 0.0010 against 0.0010-0.0011; the KL bound is the steadier measure
    assert native.top1 >= torch_path.top1 - 0.03, report
    assert native.kl <= 1.2 * torch_path.kl, report


@pytest.mark.skipif(not native_q8_supported(torch.bfloat16, torch.device("cpu")), reason="no C compiler")
def test_the_q8_0_head_scores_as_well_as_its_bf16_copy(
    sources: Sources, prompts: list[list[int]], reference: tuple[list[list[int]], list[torch.Tensor]]
) -> None:
    """The served default's head for few decode rows (the file's Q8_0 values, float32 sums)
    against its bf16 copy (what many rows take): at least as close to the float32 model."""
    config, tensors = sources
    weights = prepare_llama_weights(config, dict(tensors), "int4", torch.bfloat16)
    q8 = LlamaModel(config, torch.bfloat16, weights, max_small_batch_rows=len(prompts))
    assert isinstance(q8.lm_head, RowSwitchLinear) and isinstance(q8.lm_head.small, Q8Linear)
    dense_tensors = {k: t for k, t in weights.tensors.items() if not k.startswith("lm_head.q8_")}
    dense_weights = PreparedWeights(config, weights.quantization, weights.head_quantization, dense_tensors)
    dense = LlamaModel(config, torch.bfloat16, dense_weights, max_small_batch_rows=len(prompts))
    # (a bf16 head beside its float32 copy where float32 GEMMs win many rows, else one bf16 head)
    assert not isinstance(getattr(dense.lm_head, "small", None), Q8Linear)
    q8_score = _score(q8, torch.bfloat16, prompts, reference)
    dense_score = _score(dense, torch.bfloat16, prompts, reference)
    report = f"bf16 head: {dense_score}; q8_0 head: {q8_score}"
    print(report)
    assert q8_score.top1 >= dense_score.top1 - 0.02, report
    assert q8_score.kl <= 1.05 * dense_score.kl, report


@pytest.mark.skipif(
    not native_decode_supported(torch.bfloat16, torch.device("cpu"), 9, 3, 64, BLOCK_SIZE), reason="no C compiler"
)
def test_the_fused_decode_layers_score_as_well_as_the_layer_by_layer_path(
    sources: Sources, prompts: list[list[int]], reference: tuple[list[list[int]], list[torch.Tensor]]
) -> None:
    """The served default (bf16, int4) with every decode step's layers in one native call against
    the same model layer by layer (native attention both): as close to the float32 model."""
    config, tensors = sources
    weights = prepare_llama_weights(config, dict(tensors), "int4", torch.bfloat16)
    model = LlamaModel(config, torch.bfloat16, weights, max_small_batch_rows=len(prompts))
    assert model._layer_table is not None
    fused = _score(model, torch.bfloat16, prompts, reference, native=True)
    model._layer_table = None
    stepwise = _score(model, torch.bfloat16, prompts, reference, native=True)
    report = f"layer by layer: {stepwise}; fused: {fused}"
    print(report)
    # measured: AMD EPYC guest top-1 0.981 fused against 0.984, KL 0.0007 both; Intel Xeon guest
    # with AMX top-1 0.984 both, KL 0.00076 against 0.00068 (rounding differs from torch's op)
    assert fused.top1 >= stepwise.top1 - 0.02, report
    assert fused.kl <= 1.25 * stepwise.kl, report
