"""Scheduling policy: under "priority", lower values are admitted first, given budget first and preempted last.

No model: each step is `schedule()` then `update()` with a fake sampled token for every request
that reaches its last token. Under "fcfs" the same scenarios keep arrival order.
"""

from __future__ import annotations

import itertools

import pytest

from loom.engine.kv_cache import KVCacheManager
from loom.engine.request import EngineRequest, Request, RequestStatus
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

EOS = 2
TOKEN = 100
BLOCK_SIZE = 4
_prompt_starts = itertools.count(1000, 1000)


def make_scheduler(policy: str, num_blocks: int = 64, **config: object) -> Scheduler:
    return Scheduler(SchedulerConfig(policy=policy, **config), KVCacheManager(num_blocks, BLOCK_SIZE))  # type: ignore[arg-type]


def make_request(req_id: str, priority: int = 0, num_prompt_tokens: int = 4, max_tokens: int = 3) -> Request:
    start = next(_prompt_starts)  # distinct prompts: no prefix-cache hits between requests
    prompt = tuple(range(start, start + num_prompt_tokens))
    return Request(EngineRequest(req_id, prompt, SamplingParams(max_tokens=max_tokens), priority), eos_token_id=EOS)


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    sampled = {req.req_id: TOKEN for req, n in out.scheduled if req.num_computed_tokens + n == req.num_tokens}
    sched.update(out, sampled)
    return out


def run_all(sched: Scheduler) -> tuple[list[str], list[str]]:
    """Steps until idle; returns request ids in order of first being scheduled and of finishing."""
    started: list[str] = []
    finished: list[str] = []
    for _ in range(1000):
        if not sched.has_work:
            break
        for req, _ in step(sched).scheduled:
            if req.req_id not in started:
                started.append(req.req_id)
            if req.status.finished and req.req_id not in finished:
                finished.append(req.req_id)
    assert not sched.has_work
    return started, finished


def saturate(policy: str) -> tuple[Scheduler, list[Request]]:
    """One sequence slot, taken by "running"; then two low-priority requests, then a later high-priority one."""
    sched = make_scheduler(policy, max_num_seqs=1)
    running = make_request("running", priority=0)
    sched.add(running)
    step(sched)
    assert sched.running == [running]
    later = [make_request("low-1", priority=5), make_request("low-2", priority=5), make_request("high", priority=-1)]
    for req in later:
        sched.add(req)
    return sched, later


# --- admission ---------------------------------------------------------------------------------


def test_later_high_priority_request_runs_before_earlier_low_priority_ones_when_saturated() -> None:
    sched, _ = saturate("priority")
    assert [r.req_id for r in sched.waiting] == ["high", "low-1", "low-2"]
    started, finished = run_all(sched)
    assert started == ["running", "high", "low-1", "low-2"]
    assert finished == ["running", "high", "low-1", "low-2"]


def test_fcfs_ignores_priority_and_keeps_arrival_order() -> None:
    sched, _ = saturate("fcfs")
    started, finished = run_all(sched)
    assert started == ["running", "low-1", "low-2", "high"]
    assert finished == started


def test_a_running_request_is_not_displaced_by_a_higher_priority_arrival() -> None:
    sched, _ = saturate("priority")
    out = step(sched)
    assert [r.req_id for r, _ in out.scheduled] == ["running"]


def test_equal_priorities_keep_arrival_order() -> None:
    sched = make_scheduler("priority", max_num_seqs=1)
    for req_id in ("a", "b", "c"):
        sched.add(make_request(req_id, priority=3))
    started, _ = run_all(sched)
    assert started == ["a", "b", "c"]


@pytest.mark.parametrize(("policy", "expected"), [("priority", [("high", 8)]), ("fcfs", [("low", 1), ("high", 7)])])
def test_running_requests_share_the_token_budget_in_policy_order(policy: str, expected: list[tuple[str, int]]) -> None:
    sched = make_scheduler(policy, max_num_batched_tokens=8)
    sched.add(make_request("low", 9, num_prompt_tokens=20))
    step(sched)
    sched.add(make_request("high", 1, num_prompt_tokens=20))
    step(sched)  # low: 8 more prompt tokens
    out = step(sched)  # low: its last 4 and a sampled token; high admitted with the 4 left
    assert [(r.req_id, n) for r, n in out.scheduled] == [("low", 4), ("high", 4)]
    out = step(sched)  # both running: who is served first decides who gets the 8
    assert [(r.req_id, n) for r, n in out.scheduled] == expected


# --- preemption --------------------------------------------------------------------------------


def fill_pool(policy: str, priorities: dict[str, int]) -> Scheduler:
    """Runs one 6-token request per entry (in that arrival order) until every block of the pool is full."""
    sched = make_scheduler(policy, num_blocks=2 * len(priorities))
    for req_id, priority in priorities.items():
        sched.add(make_request(req_id, priority, num_prompt_tokens=6, max_tokens=10))
    for _ in range(3):  # prefill, then decode up to 8 tokens each: 2 full blocks each
        assert not step(sched).preempted
    assert sched.kv.num_free_blocks == 0
    return sched


def test_lowest_priority_running_request_is_preempted_first() -> None:
    sched = fill_pool("priority", {"low-early": 5, "high": 0, "mid": 2})
    out = step(sched)
    assert [r.req_id for r in out.preempted] == ["low-early"]  # the earliest arrival, but the lowest priority
    assert sorted(r.req_id for r, _ in out.scheduled) == ["high", "mid"]

    victims: list[str] = []
    while sched.has_work:
        lowest_first = sorted(sched.running, key=lambda r: (-r.priority, -r.arrival))
        out = step(sched)
        assert out.preempted == lowest_first[: len(out.preempted)]
        victims.extend(r.req_id for r in out.preempted)
    assert "mid" in victims and "high" not in victims


def test_fcfs_preempts_the_latest_arrival_whatever_its_priority() -> None:
    sched = fill_pool("fcfs", {"low-early": 0, "high": 0, "latest": 0})
    out = step(sched)
    assert [r.req_id for r in out.preempted] == ["latest"]


def test_preempted_request_rejoins_waiting_queue_at_its_priority() -> None:
    sched = fill_pool("priority", {"a": 1, "b": 5})
    waiting_low, waiting_high = make_request("waiting-low", 9), make_request("waiting-high", 0)
    sched.add(waiting_low)
    sched.add(waiting_high)
    out = step(sched)
    assert [r.req_id for r in out.preempted] == ["b"]
    assert [r.req_id for r in sched.waiting] == ["waiting-high", "b", "waiting-low"]
    assert sched.requests["b"].status == RequestStatus.PREEMPTED


def test_every_request_finishes_under_pressure_with_mixed_priorities() -> None:
    sched = make_scheduler("priority", num_blocks=6, max_num_batched_tokens=10)
    reqs = [make_request(f"r{i}", priority=i % 3, num_prompt_tokens=5 + i, max_tokens=7) for i in range(6)]
    for req in reqs:
        sched.add(req)
    num_preempted = 0
    for _ in range(1000):
        if not sched.has_work:
            break
        num_preempted += len(step(sched).preempted)
    assert num_preempted > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and len(r.output_ids) == 7 for r in reqs)
    assert sched.kv.num_free_blocks == 6
