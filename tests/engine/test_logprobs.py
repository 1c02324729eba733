"""Logprobs and prompt logprobs, and the penalty / mask fields, end to end through `EngineCore`.

The sampler's records are checked on hand-made logits first (raw distribution, rank, top-k order);
then the default SmolLM2 model runs through the whole core in float32: greedy logprobs report the
argmax, prompt logprobs have one entry per prompt token and agree with the logprobs the decode
path reported for the same tokens, whether the prompt runs whole, chunked or preempted; and
logit_bias, bad_words, allowed_token_ids and repetition_penalty visibly steer real generations.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from batch_helpers import admitted_request, sample_output

from loom.engine.core import EngineCore
from loom.engine.kv_cache import KVCacheManager
from loom.engine.logprobs import TokenLogprob
from loom.engine.request import EngineRequest, Request
from loom.engine.runner import ModelRunner
from loom.engine.sampler import token_logprobs
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import CoreOutput, Scheduler, SchedulerConfig, SchedulerOutput
from loom.models.llama import LlamaModel
from loom.models.native import logprob_ranks, native_logprobs_supported
from loom.models.registry import load_model
from loom.tokenizer import load_tokenizer

EOS = 2
VOCAB = 16
BLOCK_SIZE = 16
CONVERSATIONS = [
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three prime numbers."}],
]


# --- sampler, hand-made logits ----------------------------------------------------------------


def make_request(req_id: str = "r", **params: object) -> Request:
    return admitted_request(req_id, (10, 11, 12), VOCAB, EOS, **params)


def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int | None], list[TokenLogprob | None] | None]:
    out = sample_output(logits, reqs)
    return out.token_ids, out.logprobs


def test_token_logprobs_rank_and_top_k_best_first() -> None:
    logprobs = torch.tensor([[-3.0, -0.5, -2.0, -1.0], [-1.0, -2.0, -0.2, -4.0]])
    records = token_logprobs(logprobs, torch.tensor([2, 2]), [2, 0])
    assert records[0] == TokenLogprob(2, -2.0, 3, ((1, -0.5), (3, -1.0)))
    assert records[1] == TokenLogprob(2, pytest.approx(-0.2), 1, ())  # type: ignore[arg-type]


@pytest.mark.skipif(not native_logprobs_supported(), reason="no C compiler")
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_the_native_ranks_and_best_tokens_are_the_torch_paths(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    logprobs = (torch.randn(7, 49_157, generator=gen) * 3).log_softmax(dim=-1)  # not a multiple of 16
    logprobs[1, 100:140] = logprobs[1].max() + 1  # a tie for first place: index order, as topk keeps it
    logprobs[2, -1] = logprobs[2].max() + 1  # the best token in the tail past the last full vector
    chosen = torch.tensor([0, 120, 49_156, 7, 8, 9, 10])
    chosen[3] = logprobs[3].argmax()  # rank 1
    chosen[4] = logprobs[4].argmin()  # last
    ranks, ids, values = logprob_ranks(logprobs, chosen, k)
    assert ranks.tolist() == ((logprobs > logprobs.gather(1, chosen[:, None])).sum(dim=1) + 1).tolist()
    top_values, top_ids = logprobs.topk(k, dim=1)
    assert torch.equal(values, top_values)
    untied = [0, *range(2, 7)]
    assert torch.equal(ids[untied], top_ids[untied])
    assert ids[1].tolist() == list(range(100, 100 + k))
    with pytest.raises(IndexError):
        logprob_ranks(logprobs, torch.tensor([0, 1, 2, 3, 4, 5, 49_157]), k)


def test_no_row_asking_means_no_logprobs() -> None:
    _, logprobs = sample(torch.randn(3, VOCAB), [make_request(f"r{i}", temperature=0) for i in range(3)])
    assert logprobs is None


def test_greedy_logprob_is_the_max_of_the_log_softmax() -> None:
    logits = torch.randn(3, VOCAB) * 3
    reqs = [
        make_request("a", temperature=0, logprobs=4),
        make_request("b", temperature=0),
        make_request("c", temperature=0, logprobs=0),
    ]
    tokens, logprobs = sample(logits, reqs)
    assert logprobs is not None and logprobs[1] is None
    expected = logits.log_softmax(dim=-1)
    for row in (0, 2):
        record = logprobs[row]
        assert record is not None and record.token_id == tokens[row] == int(logits[row].argmax())
        assert record.rank == 1
        assert record.logprob == pytest.approx(float(expected[row].max()), abs=1e-6)
    assert logprobs[2] is not None and logprobs[2].top == ()
    top = logprobs[0].top if logprobs[0] is not None else ()
    assert [t for t, _ in top] == expected[0].topk(4).indices.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_logprobs_come_from_the_raw_distribution() -> None:
    """Temperature, penalties and logit_bias steer the choice but not the reported logprobs."""
    logits = torch.randn(1, VOCAB) * 3
    raw = logits.log_softmax(dim=-1)[0]
    worst = int(logits[0].argmin())
    req = make_request(temperature=0.3, logit_bias=((worst, 100.0),), presence_penalty=1.0, logprobs=3)
    tokens, logprobs = sample(logits, [req])
    assert tokens == [worst]
    record = logprobs[0] if logprobs else None
    assert record is not None and record.token_id == worst
    assert record.logprob == pytest.approx(float(raw[worst]), abs=1e-6)
    assert record.rank == VOCAB  # the least likely token of the model's distribution
    assert [t for t, _ in record.top] == raw.topk(3).indices.tolist()


def test_sampled_token_rank_matches_its_position_in_the_raw_order() -> None:
    logits = torch.randn(400, VOCAB)
    reqs = [make_request(f"r{i}", temperature=1.0, logprobs=VOCAB) for i in range(400)]
    tokens, logprobs = sample(logits, reqs)
    assert logprobs is not None
    for token, record in zip(tokens, logprobs, strict=True):
        assert record is not None and record.token_id == token
        assert [t for t, _ in record.top].index(token) + 1 == record.rank
    assert len({r.rank for r in logprobs if r is not None}) > 3  # sampling does pick non-argmax tokens


# --- through EngineCore with the default model ------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread: None) -> None:
    """Every test of this module runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def model(model_path: Path) -> LlamaModel:
    return load_model(model_path, torch.float32)


@pytest.fixture(scope="module")
def prompts(model_path: Path) -> list[tuple[int, ...]]:
    tok = load_tokenizer(model_path)
    texts = [tok.hf.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS]
    return [tuple(tok.encode(text)) for text in texts]


def build_core(model: LlamaModel, max_num_batched_tokens: int = 512, num_blocks: int = 64) -> EngineCore:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens)
    sched = Scheduler(config, KVCacheManager(num_blocks, BLOCK_SIZE))
    return EngineCore(sched, ModelRunner(model, num_blocks, BLOCK_SIZE, torch.float32), eos_token_id=EOS)


def run(core: EngineCore, requests: list[EngineRequest]) -> dict[str, list[CoreOutput]]:
    for req in requests:
        core.add_request(req)
    outputs: dict[str, list[CoreOutput]] = {req.req_id: [] for req in requests}
    for _ in range(10_000):
        if not core.has_work:
            break
        for out in core.step():
            outputs[out.req_id].append(out)
    assert not core.has_work
    return outputs


def token_ids(outputs: list[CoreOutput]) -> list[int]:
    return [t for out in outputs for t in out.new_token_ids]


def test_greedy_logprobs_report_the_argmax_with_sorted_top(model: LlamaModel, prompts: list[tuple[int, ...]]) -> None:
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=5)
    outputs = run(build_core(model), [EngineRequest("g", prompts[0], params)])["g"]
    assert len(outputs) == 12
    for out in outputs:
        assert out.logprobs is not None and len(out.logprobs) == len(out.new_token_ids) == 1
        record = out.logprobs[0]
        assert record.token_id == out.new_token_ids[0] and record.rank == 1
        assert len(record.top) == 5 and record.top[0] == (record.token_id, record.logprob)
        values = [lp for _, lp in record.top]
        assert values == sorted(values, reverse=True) and values[0] <= 0.0
        assert out.prompt_logprobs is None  # not asked for


def test_prompt_logprobs_agree_with_decode_logprobs_of_the_same_tokens(
    model: LlamaModel, prompts: list[tuple[int, ...]]
) -> None:
    """The decode path's logprob of each generated token equals the prefill path's logprob of it as a prompt token."""
    prompt = prompts[1]
    generated = run(
        build_core(model), [EngineRequest("g", prompt, SamplingParams(max_tokens=10, temperature=0, logprobs=2))]
    )
    decode_records = [out.logprobs[0] for out in generated["g"] if out.logprobs]
    full_prompt = prompt + tuple(token_ids(generated["g"]))
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    outputs = run(build_core(model), [EngineRequest("p", full_prompt, params)])["p"]
    prompt_logprobs = outputs[0].prompt_logprobs
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(full_prompt)
    assert prompt_logprobs[0] is None
    for i, record in enumerate(prompt_logprobs[1:], start=1):
        assert record is not None and record.token_id == full_prompt[i] and record.rank >= 1
        assert len(record.top) == 2
    for j, decoded in enumerate(decode_records):
        record = prompt_logprobs[len(prompt) + j]
        assert record is not None and record.token_id == decoded.token_id
        assert record.rank == decoded.rank == 1
        assert record.logprob == pytest.approx(decoded.logprob, abs=1e-4)
        assert [t for t, _ in record.top] == [t for t, _ in decoded.top]


def _prompt_logprob_run(
    model: LlamaModel, prompts: list[tuple[int, ...]], **setup: int
) -> tuple[dict[str, list[CoreOutput]], int]:
    core = build_core(model, **setup)
    preempted: list[Request] = []
    schedule = core.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        preempted.extend(out.preempted)
        return out

    core.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    requests = [
        EngineRequest(str(i), prompt, SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=3, min_tokens=16))
        for i, prompt in enumerate(prompts)
    ]
    requests.append(EngineRequest("plain", prompts[0], SamplingParams(max_tokens=16, temperature=0)))
    return run(core, requests), len(preempted)


@pytest.fixture(scope="module")
def whole_prompt_reference(model: LlamaModel, prompts: list[tuple[int, ...]]) -> dict[str, list[CoreOutput]]:
    return _prompt_logprob_run(model, prompts)[0]


@pytest.mark.parametrize(
    "setup",
    [{"max_num_batched_tokens": 7}, {"num_blocks": 7}, {"max_num_batched_tokens": 7, "num_blocks": 5}],
    ids=["chunked-prefill", "preempted", "preempted-mid-prompt"],  # the last preempts a half-prefilled prompt
)
def test_prompt_logprobs_whole_chunked_or_preempted_agree_and_come_once(
    model: LlamaModel,
    prompts: list[tuple[int, ...]],
    whole_prompt_reference: dict[str, list[CoreOutput]],
    setup: dict[str, int],
) -> None:
    reference = whole_prompt_reference
    outputs, num_preempted = _prompt_logprob_run(model, prompts, **setup)
    if "num_blocks" in setup:
        assert num_preempted > 0
    assert all(out.prompt_logprobs is None for out in outputs["plain"])
    for i, prompt in enumerate(prompts):
        ours, theirs = outputs[str(i)], reference[str(i)]
        assert token_ids(ours) == token_ids(theirs)
        assert all(out.prompt_logprobs is None for out in ours[1:])  # delivered with the first output only
        got, want = ours[0].prompt_logprobs, theirs[0].prompt_logprobs
        assert got is not None and want is not None
        assert len(got) == len(want) == len(prompt)
        assert got[0] is None and want[0] is None
        for position, (a, b) in enumerate(zip(got[1:], want[1:], strict=True), start=1):
            assert a is not None and b is not None
            assert a.token_id == b.token_id == prompt[position]
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == 3


def test_logit_bias_plus_100_makes_every_output_that_token(model: LlamaModel, prompts: list[tuple[int, ...]]) -> None:
    forced = 4461  # an ordinary word piece, not EOS
    requests = [
        EngineRequest(
            f"s{i}",
            prompts[i % 3],
            SamplingParams(max_tokens=10, temperature=1.0, seed=i, logit_bias=((forced, 100.0),)),
        )
        for i in range(3)
    ]
    outputs = run(build_core(model), requests)
    for outs in outputs.values():
        assert token_ids(outs) == [forced] * 10


def _sampled_runs(model: LlamaModel, prompt: tuple[int, ...], **params: object) -> list[list[int]]:
    requests = [
        EngineRequest(f"s{i}", prompt, SamplingParams(max_tokens=24, temperature=1.0, seed=i, **params))  # type: ignore[arg-type]
        for i in range(6)
    ]
    return [token_ids(outs) for outs in run(build_core(model), requests).values()]


def _bigrams(runs: list[list[int]]) -> set[tuple[int, int]]:
    return {pair for ids in runs for pair in zip(ids, ids[1:], strict=False)}


def test_bad_words_never_appear_in_sampled_outputs(model: LlamaModel, prompts: list[tuple[int, ...]]) -> None:
    newline, comma = 198, 28  # the poem's line breaks; a multi-token word: "," then the baseline's next token
    baseline = _sampled_runs(model, prompts[0])
    following = Counter(b for a, b in _bigrams(baseline) if a == comma and b != newline)
    assert newline in {t for ids in baseline for t in ids} and following, "the baseline no longer shows the words"
    word = (comma, following.most_common(1)[0][0])
    assert word in _bigrams(baseline)
    banned = _sampled_runs(model, prompts[0], bad_words_ids=((newline,), word))
    assert all(newline not in ids for ids in banned)
    assert word not in _bigrams(banned)
    assert any(comma in ids for ids in banned)  # the word's first token alone is still allowed


def test_allowed_token_ids_bound_every_output_id(model: LlamaModel, prompts: list[tuple[int, ...]]) -> None:
    allowed = (504, 6147, 282, 260, 5065, 28, 253, 198, 30)
    for ids in _sampled_runs(model, prompts[0], allowed_token_ids=allowed):
        assert len(ids) == 24 and set(ids) <= set(allowed)


def test_repetition_and_frequency_penalties_reduce_repeats_in_greedy_output(
    model: LlamaModel, prompts: list[tuple[int, ...]]
) -> None:
    def repeats(**params: float) -> int:
        request = EngineRequest("g", prompts[0], SamplingParams(max_tokens=24, temperature=0, **params))  # type: ignore[arg-type]
        ids = token_ids(run(build_core(model), [request])["g"])
        return len(ids) - len(set(ids))

    baseline = repeats()
    assert baseline >= 3
    assert repeats(repetition_penalty=1.5) < baseline
    assert repeats(frequency_penalty=2.0, presence_penalty=1.0) < baseline


def test_sampled_logprobs_are_finite_and_ranked_under_processors(
    model: LlamaModel, prompts: list[tuple[int, ...]]
) -> None:
    params = SamplingParams(
        max_tokens=8,
        temperature=0.8,
        seed=3,
        logprobs=5,
        frequency_penalty=0.5,
        repetition_penalty=1.2,
        logit_bias=((260, 2.0),),
    )
    outputs = run(build_core(model), [EngineRequest("x", prompts[2], params)])["x"]
    for out in outputs:
        assert out.logprobs is not None
        record = out.logprobs[0]
        assert math.isfinite(record.logprob) and record.logprob <= 0 and record.rank >= 1
        assert (record.rank == 1) == (record.top[0][0] == record.token_id)
