"""Prefix caching: full KV blocks shared by chained content hash, salted, reference-counted, LRU-evicted.

The scheduler-level tests need no model: a step is `schedule()` then `update()` with a fake
sampled token. The last tests run the real default model through `EngineCore` and require a
request whose prefix is cached to pick exactly the greedy tokens it picks without the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loom.engine.core import EngineCore
from loom.engine.kv_cache import KVCacheManager, hash_block
from loom.engine.request import EngineRequest, Request, RequestStatus
from loom.engine.runner import ModelRunner
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import CoreOutput, Scheduler, SchedulerConfig, SchedulerOutput

EOS = 2
TOKEN = 100
BLOCK_SIZE = 4
PROMPT = tuple(range(1000, 1010))  # 10 tokens: two full blocks and a partial one


def make_scheduler(num_blocks: int = 64, enable_prefix_caching: bool = True, **config: object) -> Scheduler:
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching)
    return Scheduler(SchedulerConfig(**config), kv)  # type: ignore[arg-type]


def make_request(
    req_id: str, prompt: tuple[int, ...] = PROMPT, cache_salt: str | None = None, **params: object
) -> Request:
    params.setdefault("max_tokens", 20)
    submitted = EngineRequest(req_id, prompt, SamplingParams(**params), cache_salt=cache_salt)  # type: ignore[arg-type]
    return Request(submitted, eos_token_id=EOS)


def step(sched: Scheduler) -> tuple[SchedulerOutput, list[CoreOutput]]:
    out = sched.schedule()
    sampled = {req.req_id: TOKEN for req, n in out.scheduled if req.num_computed_tokens + n == req.num_tokens}
    return out, sched.update(out, sampled)


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {req.req_id: n for req, n in out.scheduled}


def run_prefill(sched: Scheduler, req: Request) -> list[CoreOutput]:
    """Adds `req` and steps until it has sampled its first token."""
    sched.add(req)
    results = []
    while not req.output_ids:
        results.extend(step(sched)[1])
    return results


def refs(sched: Scheduler, block_ids: list[int]) -> list[int]:
    return [sched.kv.pool.ref_counts[b] for b in block_ids]


# --- sharing -----------------------------------------------------------------------------------


def test_second_request_with_same_prompt_shares_full_blocks_and_computes_the_rest() -> None:
    sched = make_scheduler()
    first = make_request("first")
    run_prefill(sched, first)
    second = make_request("second", PROMPT + (7, 7))
    sched.add(second)
    out, _ = step(sched)
    assert scheduled(out) == {"first": 1, "second": 12 - 8}  # two full blocks of 4 came from the cache
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] != first.block_ids[2]  # the partial block is never shared
    assert refs(sched, first.block_ids[:2]) == [2, 2]
    assert second.num_cached_tokens == 8


def test_only_full_blocks_of_the_prompt_are_shared() -> None:
    sched = make_scheduler()
    run_prefill(sched, make_request("first", PROMPT[:6]))  # one full block, one half block
    second = make_request("second", PROMPT[:6])
    sched.add(second)
    out, _ = step(sched)
    assert scheduled(out)["second"] == 2
    assert second.num_computed_tokens == 6


def test_a_fully_cached_prompt_still_computes_its_last_token() -> None:
    sched = make_scheduler()
    prompt = PROMPT[:9]  # two full blocks plus one token
    run_prefill(sched, make_request("first", prompt))
    second = make_request("second", prompt)
    sched.add(second)
    out, _ = step(sched)
    assert scheduled(out)["second"] == 1  # the last position produces the logits to sample from

    exact = make_request("exact", PROMPT[:8])  # two full blocks: the second is recomputed, not written while shared
    sched.add(exact)
    out, _ = step(sched)
    assert scheduled(out)["exact"] == 4
    assert exact.num_cached_tokens == 4


def test_hash_chain_means_equal_blocks_after_different_prefixes_do_not_match() -> None:
    sched = make_scheduler()
    run_prefill(sched, make_request("first"))
    other_start = (5,) + PROMPT[1:]  # block 1 has the same tokens, block 0 does not
    second = make_request("second", other_start)
    sched.add(second)
    out, _ = step(sched)
    assert scheduled(out)["second"] == 10
    assert second.num_cached_tokens == 0


def test_blocks_filled_by_output_tokens_are_shared_too() -> None:
    sched = make_scheduler()
    first = make_request("first", PROMPT[:6])
    run_prefill(sched, first)
    step(sched)
    step(sched)  # 6 prompt + 2 output tokens computed: the second block is full
    continued = make_request("continued", PROMPT[:6] + (TOKEN, TOKEN, 9))
    sched.add(continued)
    out, _ = step(sched)
    assert scheduled(out)["continued"] == 1
    assert continued.block_ids[:2] == first.block_ids[:2]


def test_requests_admitted_together_compute_their_own_blocks_and_both_free_cleanly() -> None:
    sched = make_scheduler(num_blocks=16)
    a, b = make_request("a"), make_request("b")
    sched.add(a)
    sched.add(b)
    out, _ = step(sched)
    assert scheduled(out) == {"a": 10, "b": 10}  # nothing was cached yet when both were admitted
    assert not set(a.block_ids) & set(b.block_ids)
    sched.abort("a")
    sched.abort("b")
    assert sched.kv.num_free_blocks == 16
    late = make_request("late")
    sched.add(late)
    step(sched)
    assert late.num_cached_tokens == 8  # the first registration of each hash is the one kept


# --- reference counts and reuse ----------------------------------------------------------------


def test_shared_blocks_stay_held_until_the_last_holder_frees_them() -> None:
    sched = make_scheduler(num_blocks=8)
    first, second = make_request("first"), make_request("second")
    run_prefill(sched, first)
    run_prefill(sched, second)
    shared = second.block_ids[:2]
    assert refs(sched, shared) == [2, 2]
    assert sched.kv.num_free_blocks == 8 - 3 - 1  # 3 blocks of first, 1 of second's own

    sched.abort("first")
    assert refs(sched, shared) == [1, 1]
    assert sched.kv.num_free_blocks == 8 - 3
    sched.abort("second")
    assert refs(sched, shared) == [0, 0]
    assert sched.kv.num_free_blocks == 8  # unreferenced cached blocks count as free ...
    assert sched.kv.pool.num_cached >= 2  # ... and are still findable


def test_a_finished_request_leaves_its_prefix_for_the_next_one() -> None:
    sched = make_scheduler()
    first = make_request("first", max_tokens=1)
    run_prefill(sched, first)
    assert first.status == RequestStatus.FINISHED_LENGTH and first.block_ids == []
    results = run_prefill(sched, make_request("next"))
    assert [r.num_cached_tokens for r in results] == [8]


def test_cached_token_count_is_reported_on_every_output() -> None:
    sched = make_scheduler()
    cold = run_prefill(sched, make_request("cold", max_tokens=3))
    warm_req = make_request("warm", max_tokens=3)
    sched.add(warm_req)
    warm: list[CoreOutput] = []
    while not warm_req.status.finished:
        warm.extend(r for r in step(sched)[1] if r.req_id == "warm")
    assert [r.num_cached_tokens for r in cold] == [0]
    assert [r.num_cached_tokens for r in warm] == [8, 8, 8]


def test_prompt_logprobs_requests_compute_every_prompt_position() -> None:
    sched = make_scheduler()
    run_prefill(sched, make_request("first"))
    wants_logprobs = make_request("logprobs", prompt_logprobs=0)
    sched.add(wants_logprobs)
    out, _ = step(sched)
    assert scheduled(out)["logprobs"] == 10
    assert wants_logprobs.num_cached_tokens == 0


def test_disabled_prefix_caching_shares_nothing() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    first = make_request("first")
    run_prefill(sched, first)
    second = make_request("second")
    sched.add(second)
    out, _ = step(sched)
    assert scheduled(out)["second"] == 10
    assert not set(first.block_ids) & set(second.block_ids)
    assert sched.kv.pool.num_cached == 0


# --- cache_salt --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first_salt", "second_salt", "num_cached"),
    [
        (None, None, 8),
        ("tenant-a", "tenant-a", 8),
        ("tenant-a", "tenant-b", 0),
        ("tenant-a", None, 0),
        (None, "tenant-a", 0),
        ("", None, 0),  # an empty salt is still a salt
    ],
)
def test_cache_salt_shares_blocks_only_between_equal_salts(
    first_salt: str | None, second_salt: str | None, num_cached: int
) -> None:
    sched = make_scheduler()
    first = make_request("first", cache_salt=first_salt)
    run_prefill(sched, first)
    second = make_request("second", cache_salt=second_salt)
    sched.add(second)
    out, _ = step(sched)
    assert second.num_cached_tokens == num_cached
    assert scheduled(out)["second"] == 10 - num_cached
    assert (second.block_ids[:2] == first.block_ids[:2]) == (num_cached == 8)


def test_block_hash_depends_on_parent_and_tokens() -> None:
    root_a, root_b = b"a" * 32, b"b" * 32
    assert hash_block(root_a, [1, 2, 3, 4]) == hash_block(root_a, [1, 2, 3, 4])
    assert hash_block(root_a, [1, 2, 3, 4]) != hash_block(root_b, [1, 2, 3, 4])
    assert hash_block(root_a, [1, 2, 3, 4]) != hash_block(root_a, [1, 2, 4, 3])
    assert hash_block(root_a, [2**40]) != hash_block(root_a, [0])  # no truncation of large ids


# --- LRU eviction ------------------------------------------------------------------------------


def cached_length(sched: Scheduler, prompt: tuple[int, ...]) -> int:
    """How many leading tokens of `prompt` the prefix cache holds now (probing admits nothing)."""
    return sched.kv.find_cached_prefix(make_request("probe", prompt + (0,))).num_tokens


def test_cached_blocks_are_evicted_only_when_no_empty_block_is_left_and_oldest_first() -> None:
    sched = make_scheduler(num_blocks=6)
    old_prompt, new_prompt = PROMPT[:8], tuple(range(2000, 2008))  # two full blocks each
    for req_id, prompt in (("old", old_prompt), ("new", new_prompt)):
        run_prefill(sched, make_request(req_id, prompt))
        sched.abort(req_id)  # "old" is freed first, so it is the least recently used
    assert sched.kv.pool.num_cached == 4 and sched.kv.num_free_blocks == 6

    sched.add(make_request("filler", tuple(range(3000, 3007))))  # takes the 2 empty blocks
    step(sched)
    assert cached_length(sched, old_prompt) == 8 and cached_length(sched, new_prompt) == 8

    sched.add(make_request("big", tuple(range(4000, 4007))))  # 2 more: evicts the 2 least recently freed
    step(sched)
    assert cached_length(sched, old_prompt) == 0
    assert cached_length(sched, new_prompt) == 8
    sched.abort("filler")
    sched.abort("big")
    again = make_request("new-again", new_prompt + (1,))
    sched.add(again)
    step(sched)
    assert again.num_cached_tokens == 8


def test_a_request_evicts_cached_blocks_it_does_not_use_but_never_its_own_prefix() -> None:
    sched = make_scheduler(num_blocks=5)
    other = tuple(range(2000, 2008))
    for req_id, prompt in (("mine", PROMPT[:8]), ("other", other)):  # "mine" is the older of the two
        run_prefill(sched, make_request(req_id, prompt))
        sched.abort(req_id)
    again = make_request("again", PROMPT[:8] + tuple(range(5000, 5008)))  # 16 tokens: 4 blocks, 2 cached
    sched.add(again)
    out, _ = step(sched)
    assert scheduled(out) == {"again": 8}
    assert again.num_cached_tokens == 8 and len(set(again.block_ids)) == 4
    assert cached_length(sched, other) == 4  # one empty block and the tail block of "other" were taken


def test_allocation_counting_its_own_cached_prefix_as_free_fails_cleanly() -> None:
    sched = make_scheduler(num_blocks=4)
    run_prefill(sched, make_request("first", PROMPT[:8]))
    sched.abort("first")
    too_big = make_request("too-big", PROMPT[:8] + tuple(range(5000, 5009)))  # 17 tokens: 5 blocks
    sched.add(too_big)
    out, _ = step(sched)
    assert out.scheduled == [] and too_big.block_ids == []
    assert refs(sched, list(range(4))) == [0, 0, 0, 0]
    assert sched.kv.pool.num_cached == 2 and sched.kv.num_free_blocks == 4


def test_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=5, max_num_batched_tokens=64)
    first = make_request("first", PROMPT[:6], max_tokens=4)
    second = make_request("second", tuple(range(6000, 6008)))
    sched.add(first)
    sched.add(second)
    preempted: list[Request] = []
    while not preempted:
        out, _ = step(sched)
        preempted.extend(out.preempted)
    assert preempted == [second] and second.num_computed_tokens == 0
    while second.status != RequestStatus.RUNNING:
        out, _ = step(sched)
    # 8 prompt + 3 output tokens to recompute, past its two full blocks (its partial block went to "first")
    assert scheduled(out)["second"] == 8 + 3 - 8
    assert second.num_cached_tokens == 0  # usage reports the first admission only


# --- the real model: same greedy tokens with and without the cache ------------------------------

MODEL_BLOCK_SIZE = 16
NUM_NEW_TOKENS = 24
SYSTEM = (
    "You are Loom's test assistant. You answer in short, plain sentences, you never use lists, "
    "and you always mention the colour of the sky when the question allows it."
)


@pytest.fixture(scope="module")
def chat_prompts(model_path: Path) -> list[tuple[int, ...]]:
    from loom.tokenizer import load_tokenizer

    tok = load_tokenizer(model_path)
    prompts = []
    for question in ("What is the capital of France?", "Name a large animal that lives in the sea."):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        text = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tuple(tok.encode(text)))
    return prompts


@pytest.fixture(scope="module")
def model(model_path: Path, one_intra_op_thread: None) -> torch.nn.Module:
    from loom.models.registry import load_model

    return load_model(model_path, torch.float32)


def build_core(model: torch.nn.Module, enable_prefix_caching: bool) -> EngineCore:
    num_blocks = 64
    kv = KVCacheManager(num_blocks, MODEL_BLOCK_SIZE, enable_prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), kv)
    runner = ModelRunner(model, num_blocks, MODEL_BLOCK_SIZE, torch.float32)  # type: ignore[arg-type]
    return EngineCore(sched, runner, eos_token_id=EOS)


def generate(core: EngineCore, req_id: str, prompt: tuple[int, ...]) -> tuple[list[int], int]:
    """Greedy tokens of one request run alone on `core`, and its reported cached-token count."""
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, min_tokens=NUM_NEW_TOKENS, temperature=0)
    core.add_request(EngineRequest(req_id, prompt, params))
    tokens: list[int] = []
    num_cached = None
    while core.has_work:
        for out in core.step():
            tokens.extend(out.new_token_ids)
            num_cached = out.num_cached_tokens
    assert num_cached is not None
    return tokens, num_cached


def test_cached_prefix_gives_the_same_greedy_tokens_as_no_cache(
    model: torch.nn.Module, chat_prompts: list[tuple[int, ...]]
) -> None:
    first, second = chat_prompts
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert shared >= 2 * MODEL_BLOCK_SIZE  # the system prompt spans whole blocks

    uncached = build_core(model, enable_prefix_caching=False)
    expected_second, cached_without = generate(uncached, "second", second)
    assert cached_without == 0

    core = build_core(model, enable_prefix_caching=True)
    expected_first, cold = generate(core, "first", first)
    assert cold == 0
    warm_tokens, num_cached = generate(core, "second", second)  # shares the system prompt's blocks
    assert num_cached == shared // MODEL_BLOCK_SIZE * MODEL_BLOCK_SIZE
    assert warm_tokens == expected_second

    again, num_cached = generate(core, "first-again", first)  # the whole prompt but its last token
    assert num_cached == (len(first) - 1) // MODEL_BLOCK_SIZE * MODEL_BLOCK_SIZE
    assert again == expected_first
