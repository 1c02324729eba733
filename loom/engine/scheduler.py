"""Continuous batching: which requests run this step and how many tokens each computes.

Owns the waiting and running queues, chunked prefill under a per-step token budget, KV block
allocation through `KVCacheManager`, preemption (by recompute) when blocks run out, and the stop
conditions that the core can see (EOS, stop token ids, length). Never runs the model or samples.

Every step treats prefill and decode alike: a request computes the tokens it has not computed
yet (`num_tokens - num_computed_tokens`), at most the remaining budget. A request that reaches
its last token gets a new token sampled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from loom.engine.kv_cache import KVCacheManager
from loom.engine.logprobs import TokenLogprob
from loom.engine.request import Request, RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    policy: str = "fcfs"  # "fcfs" | "priority"


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, num new tokens)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


@dataclass(frozen=True, slots=True)
class CoreOutput:
    req_id: str
    new_token_ids: tuple[int, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | None  # the stop token id that ended the request
    num_prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when params.logprobs is set
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # with the first output only; [0] is None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.requests[req.req_id] = req
        self.waiting.append(req)

    def abort(self, req_id: str) -> Request | None:
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return req

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate_or_preempt(req, num_new, out):
                continue
            out.scheduled.append((req, num_new))
            budget -= num_new
        if not out.preempted:  # admitting new work while evicting old would thrash
            budget = self._admit_waiting(budget, out)
        return out

    def _allocate_or_preempt(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(req, num_new):
            victim = self.running[-1]  # the latest arrival gives way first
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req, num_new):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return budget

    def _preempt(self, req: Request) -> None:
        """Frees the request's blocks; it recomputes prompt + output when it runs again."""
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(req)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[CoreOutput]:
        """Advances computed counts, appends sampled tokens, applies stop conditions."""
        results = []
        for req, num_new in out.scheduled:
            if req.status.finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += num_new
            token = sampled.get(req.req_id)
            if token is None:  # a prefill chunk that did not reach the end of the prompt
                continue
            req.output_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self.running.remove(req)
                self.requests.pop(req.req_id, None)
                self._finish(req, status)
            results.append(
                CoreOutput(req.req_id, (token,), req.status.finish_reason, req.stop_reason, req.num_prompt_tokens)
            )
        return results

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.params
        num_output = len(req.output_ids)
        if num_output >= params.min_tokens:
            if token == req.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)
