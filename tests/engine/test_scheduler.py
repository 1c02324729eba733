"""Scheduler without a model: continuous batching, chunked prefill, preemption, stop conditions, abort.

Each step is driven by hand: `schedule()`, then `update()` with a fake sampled token for every
request whose scheduled tokens reach its last token (what the runner would sample for).
"""

from __future__ import annotations

import itertools

import pytest

from loom.engine.kv_cache import KVCacheManager
from loom.engine.request import EngineRequest, Request, RequestStatus
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import MIN_CAPPED_CHUNK, CoreOutput, Scheduler, SchedulerConfig, SchedulerOutput

EOS = 2
TOKEN = 100  # an ordinary token: never EOS, never a stop id
BLOCK_SIZE = 4


def make_scheduler(
    num_blocks: int = 64, max_num_seqs: int = 64, max_num_batched_tokens: int = 512, max_model_len: int = 8192
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len)
    return Scheduler(config, KVCacheManager(num_blocks, BLOCK_SIZE))


_prompt_starts = itertools.count(1000, 1000)


def make_request(req_id: str, num_prompt_tokens: int = 4, **params: object) -> Request:
    """Every request gets prompt ids of its own, so no two share a prefix-cache block by accident."""
    start = next(_prompt_starts)
    prompt = tuple(range(start, start + num_prompt_tokens))
    return Request(EngineRequest(req_id, prompt, SamplingParams(**params)), eos_token_id=EOS)  # type: ignore[arg-type]


def step(sched: Scheduler, tokens: dict[str, int] | None = None) -> tuple[SchedulerOutput, list[CoreOutput]]:
    """One engine step with fake sampling: `tokens[req_id]` or TOKEN for every request that samples."""
    out = sched.schedule()
    sampled = {
        req.req_id: (tokens or {}).get(req.req_id, TOKEN)
        for req, n in out.scheduled
        if req.num_computed_tokens + n == req.num_tokens
    }
    return out, sched.update(out, sampled)


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {req.req_id: n for req, n in out.scheduled}


# --- continuous batching -----------------------------------------------------------------------


def test_new_request_joins_running_batch_on_next_step() -> None:
    sched = make_scheduler()
    sched.add(make_request("a", 5, max_tokens=10))
    out, _ = step(sched)
    assert scheduled(out) == {"a": 5}
    sched.add(make_request("b", 3, max_tokens=10))
    out, results = step(sched)
    assert scheduled(out) == {"a": 1, "b": 3}
    assert [r.req_id for r in results] == ["a", "b"]
    assert all(r.new_token_ids == (TOKEN,) and r.finish_reason is None for r in results)


def test_finished_request_leaves_batch_and_frees_blocks_at_once() -> None:
    sched = make_scheduler(num_blocks=8)
    short, long_ = make_request("short", 4, max_tokens=2), make_request("long", 4, max_tokens=10)
    sched.add(short)
    sched.add(long_)
    step(sched)
    _, results = step(sched)
    assert {r.req_id: r.finish_reason for r in results} == {"short": "length", "long": None}
    assert sched.running == [long_]
    assert short.block_ids == [] and sched.kv.num_free_blocks == 8 - len(long_.block_ids)
    out, _ = step(sched)
    assert scheduled(out) == {"long": 1}


def test_running_requests_are_scheduled_before_waiting_ones() -> None:
    sched = make_scheduler(max_num_batched_tokens=6)
    sched.add(make_request("a", 4, max_tokens=10))
    step(sched)
    sched.add(make_request("b", 20, max_tokens=10))
    out, _ = step(sched)
    assert [(req.req_id, n) for req, n in out.scheduled] == [("a", 1), ("b", 5)]


# --- chunked prefill ---------------------------------------------------------------------------


def test_long_prompt_is_split_across_steps_under_token_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    req = make_request("a", 20, max_tokens=4)
    sched.add(req)
    chunks = []
    for _ in range(3):
        out, results = step(sched)
        chunks.append(scheduled(out)["a"])
        assert out.num_tokens <= 8
    assert chunks == [8, 8, 4]
    assert req.num_computed_tokens == 20 and req.output_ids == [TOKEN]
    assert len(req.block_ids) == 5


def test_decode_gets_a_token_every_step_while_prompt_is_chunked() -> None:
    sched = make_scheduler(max_num_batched_tokens=7)
    decoding = make_request("decoding", 4, max_tokens=50)
    sched.add(decoding)
    step(sched)
    long_ = make_request("long", 20, max_tokens=50)
    sched.add(long_)
    chunks = []
    while not long_.output_ids:
        before = len(decoding.output_ids)
        out, results = step(sched)
        assert out.num_tokens <= 7
        assert scheduled(out)["decoding"] == 1
        assert len(decoding.output_ids) == before + 1
        chunks.append(scheduled(out)["long"])
        if not long_.output_ids:  # a chunk short of the prompt's end samples nothing
            assert [r.req_id for r in results] == ["decoding"]
    assert chunks == [6, 6, 6, 2]
    assert long_.num_computed_tokens == 20


# --- max_num_seqs ------------------------------------------------------------------------------


def test_max_num_seqs_caps_the_running_batch() -> None:
    sched = make_scheduler(max_num_seqs=2)
    reqs = [make_request(f"r{i}", 4, max_tokens=2 + i) for i in range(4)]
    for req in reqs:
        sched.add(req)
    seen_running = []
    while sched.has_work:
        out, _ = step(sched)
        assert len(out.scheduled) <= 2
        seen_running.append(len(sched.running))
        assert len(sched.running) <= 2
    assert max(seen_running) == 2
    assert [len(r.output_ids) for r in reqs] == [2, 3, 4, 5]
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)


def test_waiting_request_is_admitted_when_a_slot_frees() -> None:
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_request("first", 4, max_tokens=2))
    sched.add(make_request("second", 4, max_tokens=2))
    out1, _ = step(sched)
    out2, _ = step(sched)
    out3, _ = step(sched)
    assert [scheduled(o) for o in (out1, out2, out3)] == [{"first": 4}, {"first": 1}, {"second": 4}]


# --- preemption --------------------------------------------------------------------------------


def test_latest_arrival_is_preempted_when_blocks_run_out_and_later_resumes() -> None:
    sched = make_scheduler(num_blocks=4)  # 16 slots: two 6-token prompts fill 2 blocks each
    first, second = make_request("first", 6, max_tokens=4), make_request("second", 6, max_tokens=4)
    waiting = make_request("waiting", 4, max_tokens=1)
    for req in (first, second, waiting):
        sched.add(req)
    for _ in range(3):  # prefill, then decode up to 8 tokens: every block full
        out, _ = step(sched)
        assert not out.preempted
    assert sched.kv.num_free_blocks == 0 and list(sched.waiting) == [waiting]

    out, _ = step(sched)  # first needs a third block: second gives way
    assert out.preempted == [second]
    assert scheduled(out) == {"first": 1}
    assert second.status == RequestStatus.PREEMPTED
    assert second.block_ids == [] and second.num_computed_tokens == 0
    assert list(sched.waiting) == [second, waiting]  # front of the queue
    assert second.output_ids == [TOKEN] * 3  # kept: they are recomputed, not resampled
    assert first.status == RequestStatus.FINISHED_LENGTH

    out, _ = step(sched)  # first finished; second recomputes prompt + output in one prefill
    # ... past its own first block, still in the prefix cache (its tail block was evicted for first)
    assert scheduled(out)["second"] == 6 + 3 - BLOCK_SIZE
    assert second.num_cached_tokens == 0  # usage counts the first admission only
    assert second.status == RequestStatus.FINISHED_LENGTH and len(second.output_ids) == 4
    while sched.has_work:
        step(sched)
    assert waiting.status == RequestStatus.FINISHED_LENGTH
    assert sched.kv.num_free_blocks == 4


def test_tiny_pool_runs_many_requests_to_completion() -> None:
    sched = make_scheduler(num_blocks=6, max_num_batched_tokens=10)
    reqs = [make_request(f"r{i}", 5 + i, max_tokens=7) for i in range(5)]
    for req in reqs:
        sched.add(req)
    num_preempted = 0
    for _ in range(500):
        if not sched.has_work:
            break
        out, _ = step(sched)
        num_preempted += len(out.preempted)
        assert sched.kv.num_free_blocks + sum(len(r.block_ids) for r in sched.running) == 6
    assert not sched.has_work
    assert num_preempted > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and len(r.output_ids) == 7 for r in reqs)
    assert sched.kv.num_free_blocks == 6


# --- stop conditions ---------------------------------------------------------------------------


def run_to_finish(sched: Scheduler, req: Request, tokens: list[int]) -> list[CoreOutput]:
    """Feeds `tokens` one per step to `req` until it finishes; returns every output it produced."""
    sched.add(req)
    results = []
    for token in tokens:
        _, step_results = step(sched, {req.req_id: token})
        results.extend(step_results)
        if req.status.finished:
            break
    return results


def test_max_tokens_finishes_with_length() -> None:
    req = make_request("a", max_tokens=3)
    results = run_to_finish(make_scheduler(), req, [TOKEN] * 10)
    assert len(req.output_ids) == 3
    assert [r.finish_reason for r in results] == [None, None, "length"]
    assert results[-1].stop_reason is None and results[-1].num_prompt_tokens == 4


def test_eos_finishes_with_stop() -> None:
    req = make_request("a", max_tokens=10)
    results = run_to_finish(make_scheduler(), req, [TOKEN, EOS, TOKEN])
    assert req.output_ids == [TOKEN, EOS]
    assert results[-1].finish_reason == "stop" and results[-1].stop_reason is None


def test_ignore_eos_keeps_generating_past_eos() -> None:
    req = make_request("a", max_tokens=4, ignore_eos=True)
    results = run_to_finish(make_scheduler(), req, [EOS] * 10)
    assert req.output_ids == [EOS] * 4
    assert results[-1].finish_reason == "length"


def test_stop_token_id_finishes_with_stop_reason() -> None:
    req = make_request("a", max_tokens=10, stop_token_ids=(7, 42))
    results = run_to_finish(make_scheduler(), req, [TOKEN, 42, TOKEN])
    assert req.output_ids == [TOKEN, 42]
    assert results[-1].finish_reason == "stop" and results[-1].stop_reason == 42


def test_min_tokens_delays_eos_and_stop_token_ids() -> None:
    eos_req = make_request("eos", max_tokens=10, min_tokens=3)
    results = run_to_finish(make_scheduler(), eos_req, [EOS] * 10)
    assert len(eos_req.output_ids) == 3  # the first two EOS are ignored
    assert results[-1].finish_reason == "stop"

    stop_req = make_request("stop", max_tokens=10, min_tokens=3, stop_token_ids=(42,))
    results = run_to_finish(make_scheduler(), stop_req, [42] * 10)
    assert len(stop_req.output_ids) == 3
    assert results[-1].finish_reason == "stop" and results[-1].stop_reason == 42


def test_eos_on_the_last_allowed_token_is_a_stop_not_length() -> None:
    req = make_request("a", max_tokens=2)
    results = run_to_finish(make_scheduler(), req, [TOKEN, EOS])
    assert results[-1].finish_reason == "stop"


def test_max_model_len_finishes_with_length() -> None:
    req = make_request("a", 5, max_tokens=100)
    results = run_to_finish(make_scheduler(max_model_len=8), req, [TOKEN] * 10)
    assert len(req.output_ids) == 3 and req.num_tokens == 8
    assert results[-1].finish_reason == "length"


# --- abort -------------------------------------------------------------------------------------


def test_abort_waiting_request_removes_it() -> None:
    sched = make_scheduler(max_num_seqs=1)
    sched.add(make_request("running", max_tokens=10))
    sched.add(make_request("waiting", max_tokens=10))
    step(sched)
    aborted = sched.abort("waiting")
    assert aborted is not None and aborted.status == RequestStatus.FINISHED_ABORTED
    assert not sched.waiting
    out, _ = step(sched)
    assert scheduled(out) == {"running": 1}


def test_abort_running_request_frees_blocks_and_leaves_batch() -> None:
    sched = make_scheduler(num_blocks=8)
    sched.add(make_request("a", 8, max_tokens=10))
    sched.add(make_request("b", 4, max_tokens=10))
    step(sched)
    sched.abort("a")
    assert [r.req_id for r in sched.running] == ["b"]
    assert sched.kv.num_free_blocks == 8 - 1
    out, _ = step(sched)
    assert scheduled(out) == {"b": 1}


def test_abort_during_step_drops_its_output() -> None:
    sched = make_scheduler()
    req = make_request("a", max_tokens=10)
    sched.add(req)
    out = sched.schedule()
    sched.abort("a")
    assert sched.update(out, {"a": TOKEN}) == []
    assert req.output_ids == [] and req.status == RequestStatus.FINISHED_ABORTED
    assert not sched.has_work


@pytest.mark.parametrize("req_id", ["unknown", "done"])
def test_abort_of_unknown_or_finished_request_is_a_no_op(req_id: str) -> None:
    sched = make_scheduler()
    run_to_finish(sched, make_request("done", max_tokens=1), [TOKEN])
    assert sched.abort(req_id) is None


# --- a long prompt's chunks beside other requests ----------------------------------------------


def _capped_scheduler() -> Scheduler:
    """A 64-token budget whose chunks beside others attend to at most 64 x 32 (query, key) pairs."""
    return Scheduler(SchedulerConfig(64, 64, 8192, chunk_attention_context=32), KVCacheManager(4096, BLOCK_SIZE))


def test_a_long_prompts_chunks_shrink_beside_other_requests_to_bound_their_attention() -> None:
    sched = _capped_scheduler()
    sched.add(make_request("short", 4, max_tokens=1000))
    step(sched)  # "short" decodes from here on
    long = make_request("long", 2000, max_tokens=1)
    sched.add(long)
    chunks = []
    while long.num_computed_tokens < 2000:
        computed = long.num_computed_tokens
        got = scheduled(step(sched)[0])
        assert got["short"] == 1  # the decode row is never held back
        chunk = got["long"]
        chunks.append(chunk)
        assert chunk * (computed + chunk) <= 64 * 32 or chunk == min(MIN_CAPPED_CHUNK, 2000 - computed)
    assert chunks[0] == 45  # the largest c with c * c <= 2048 (the budget left was 63)
    assert chunks[-2] == MIN_CAPPED_CHUNK  # late chunks stop shrinking there, so the prompt still ends
    assert sum(chunks) == 2000


def test_a_long_prompt_alone_takes_whole_chunks() -> None:
    sched = _capped_scheduler()
    sched.add(make_request("long", 2000, max_tokens=1))
    assert [scheduled(step(sched)[0])["long"] for _ in range(5)] == [64] * 5


def test_no_cap_when_the_context_limit_is_zero() -> None:
    sched = Scheduler(SchedulerConfig(64, 64, 8192, chunk_attention_context=0), KVCacheManager(4096, BLOCK_SIZE))
    sched.add(make_request("short", 4, max_tokens=1000))
    step(sched)
    sched.add(make_request("long", 2000, max_tokens=1))
    assert [scheduled(step(sched)[0])["long"] for _ in range(5)] == [63] * 5
