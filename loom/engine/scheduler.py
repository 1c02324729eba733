"""Continuous batching: which requests run this step and how many tokens each computes.

Owns the waiting and running queues, chunked prefill under a per-step token budget, KV block
allocation through `KVCacheManager` (with prefix-cache hits on admission), preemption (by
recompute) when blocks run out, and the stop conditions that the core can see (EOS, stop token
ids, length, repetition). Never runs the model or samples.

Every step treats prefill and decode alike: a request computes the tokens it has not computed
yet (`num_tokens - num_computed_tokens`), at most the remaining budget. A request that reaches
its last token gets a new token sampled. While other requests are in the engine, a chunk is also
cut so that its attention, chunk x context (query, key) pairs, stays within
`max_num_batched_tokens x chunk_attention_context` (never under MIN_CAPPED_CHUNK tokens): a long
prompt's late chunks take more, smaller steps instead of holding every other request's next token
for seconds. On admission, the full blocks of its tokens already in
the prefix cache count as computed, so it starts past them.

Order. Both queues are kept sorted by one key: `(0, arrival)` under the "fcfs" policy,
`(priority, arrival)` under "priority" (lower priority value first). Running requests get the
step's token budget in that order; waiting requests are admitted in that order (the first that
does not fit stops admission, so a later, smaller request never overtakes it); when a running
request needs a block and none is free, the running request with the largest key (the latest
arrival under fcfs, the lowest priority under priority) is preempted first. A preempted request
rejoins the waiting queue at its key's place. No request is preempted to admit a waiting one.

Structured outputs: a request whose grammar is complete after the token just sampled (it allows
nothing more but the end) finishes with "stop" at once, even below min_tokens (nothing else could
follow), before length is checked: a constraint completed by the last allowed token is "stop".

Repetition detection (`SamplingParams.repetition_detection`): after each sampled token the
scheduler checks whether the output ids (never the prompt) end with a pattern of L tokens
repeated `min_count` times back to back, for some `min_pattern_size <= L <= max_pattern_size`.
If so the request finishes with finish_reason "stop" and stop_reason "repetition_detected"
(vLLM's string), keeping the repeated tokens in its output. Like EOS it waits for `min_tokens`;
EOS and stop token ids take precedence, then length (a repeat completed by the last allowed token
reports "length"). It is off when `max_pattern_size < max(min_pattern_size, 1)` or
`min_count < 2` (a single occurrence is no repetition).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from loom.engine.kv_cache import KVCacheManager
from loom.engine.logprobs import TokenLogprob
from loom.engine.request import Request, RequestStatus
from loom.engine.sampling_params import RepetitionDetection

REPETITION_STOP_REASON = "repetition_detected"
MIN_CAPPED_CHUNK = 16  # a capped chunk still moves its prompt this far a step


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 8192
    policy: str = "fcfs"  # "fcfs" | "priority"
    # beside other running requests, a prefill chunk attends to at most max_num_batched_tokens x
    # this many (query, key) pairs (0: no cap); see `Scheduler._chunk_within_attention_budget`
    chunk_attention_context: int = 1024

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f'scheduling policy must be "fcfs" or "priority", got {self.policy!r}')


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
    stop_reason: int | str | None  # the stop token id that ended the request, or REPETITION_STOP_REASON
    num_prompt_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per new token, when params.logprobs is set
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # with the first output only; [0] is None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # the last new token is the EOS / stop token id that ended the request: counted, not text
    # (a grammar's completion or a repetition ends with a token of the text)
    ended_by_token: bool = False


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: list[Request] = []  # sorted by `_order`
        self.running: list[Request] = []  # sorted by `_order`
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since start, for metrics

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, req: Request) -> None:
        self.requests[req.req_id] = req
        bisect.insort(self.waiting, req, key=self._order)

    def _order(self, req: Request) -> tuple[int, int]:
        """Sort key of both queues: smaller is admitted first, given budget first, preempted last."""
        return (req.priority if self.config.policy == "priority" else 0, req.arrival)

    def abort(self, req_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED) -> Request | None:
        """Ends a request that is waiting or running (aborted, or FINISHED_ERROR when its own work failed)."""
        req = self.requests.pop(req_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, status)
        return req

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = self._chunk_within_attention_budget(req.num_computed_tokens, req.num_tokens, budget)
            if not self._allocate_or_preempt(req, num_new, out):
                continue
            out.scheduled.append((req, num_new))
            budget -= num_new
        if not out.preempted:  # admitting new work while evicting old would thrash
            budget = self._admit_waiting(budget, out)
        return out

    def _chunk_within_attention_budget(self, num_computed: int, num_tokens: int, budget: int) -> int:
        """How many of a request's uncomputed tokens this step computes: at most `budget`, and, while
        other requests are in the engine, few enough that the chunk's attention (chunk x context pairs)
        stays within `max_num_batched_tokens x chunk_attention_context`, never under MIN_CAPPED_CHUNK.

        A late chunk of a long prompt is mostly attention: 512 queries over 4,096 keys took ~0.9 s
        of attention on 2 cores, a step every running request waits for before its next token. The
        cap bounds that wait; the long prompt takes more, smaller steps. A request running alone
        (nobody waits) is not capped.
        """
        num_new = min(num_tokens - num_computed, budget)
        limit = self.config.max_num_batched_tokens * self.config.chunk_attention_context
        if (
            limit <= 0
            or num_new <= MIN_CAPPED_CHUNK
            or len(self.requests) <= 1
            or num_new * (num_computed + num_new) <= limit
        ):
            return num_new
        # the largest c with c * (num_computed + c) <= limit
        c = int((math.sqrt(num_computed * num_computed + 4 * limit) - num_computed) / 2)
        return max(min(c, num_new), MIN_CAPPED_CHUNK)

    def _allocate_or_preempt(self, req: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate_slots(req, num_new):
            victim = self.running[-1]  # the largest key gives way first: never one already scheduled
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        return True

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            prefix = self.kv.find_cached_prefix(req)
            num_new = self._chunk_within_attention_budget(prefix.num_tokens, req.num_tokens, budget)
            if not self.kv.allocate_slots(req, num_new, prefix):
                break
            del self.waiting[0]
            req.num_computed_tokens = prefix.num_tokens
            if req.status == RequestStatus.WAITING:  # a preempted request keeps its first count
                req.num_cached_tokens = prefix.num_tokens
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=self._order)
            out.scheduled.append((req, num_new))
            budget -= num_new
        return budget

    def _preempt(self, req: Request) -> None:
        """Frees the request's blocks; it recomputes prompt + output (past any still-cached prefix) when it runs again."""
        self.running.remove(req)
        self.kv.free(req)
        self.num_preemptions += 1
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        bisect.insort(self.waiting, req, key=self._order)

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[str, int],
        logprobs: dict[str, TokenLogprob] | None = None,
        grammar_complete: frozenset[str] = frozenset(),
        forced: dict[str, tuple[int, ...]] | None = None,
    ) -> list[CoreOutput]:
        """Advances computed counts, appends sampled tokens, applies stop conditions.

        `logprobs` holds the sampled token's record for the requests that asked for logprobs;
        `grammar_complete` the requests whose grammar allows nothing after this step's tokens;
        `forced` the tokens a grammar forces after the sampled one (fast-forward): they are
        appended too, and the next step computes them as one chunk, the way a prompt is.
        Requests that finished while the step ran (aborted, failed) are skipped.
        """
        results = []
        for req, num_new in out.scheduled:
            if req.status.finished:  # aborted while the step ran
                continue
            req.num_computed_tokens += num_new
            self.kv.cache_full_blocks(req)
            token = sampled.get(req.req_id)
            if token is None:  # a prefill chunk that did not reach the end of the prompt
                continue
            req.output_ids.append(token)
            extra = (forced or {}).get(req.req_id, ())
            status = self._check_stop(req, token, req.req_id in grammar_complete and not extra)
            if status is not None:  # ended by the sampled token itself (a repetition): nothing follows
                extra = ()
            elif extra:  # never EOS nor stop ids, and within max_tokens (see core)
                req.output_ids.extend(extra)
                status = self._check_stop(req, extra[-1], req.req_id in grammar_complete)
            if status is not None:
                self.running.remove(req)
                self.requests.pop(req.req_id, None)
                self._finish(req, status)
            results.append(
                CoreOutput(
                    req.req_id,
                    (token, *extra),
                    req.status.finish_reason,
                    req.stop_reason,
                    req.num_prompt_tokens,
                    logprobs=(logprobs[req.req_id],) if logprobs and req.req_id in logprobs else None,
                    prompt_logprobs=req.take_prompt_logprobs(),
                    num_cached_tokens=req.num_cached_tokens,
                    ended_by_token=status == RequestStatus.FINISHED_STOPPED and _is_stop_token(req, req.output_ids[-1]),
                )
            )
        return results

    def _check_stop(self, req: Request, token: int, grammar_complete: bool = False) -> RequestStatus | None:
        params = req.params
        num_output = len(req.output_ids)
        if num_output >= params.min_tokens:
            if token == req.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if grammar_complete:  # the constraint allows nothing more: done, whatever min_tokens says
            return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        detection = params.repetition_detection
        if detection is not None and num_output >= params.min_tokens and ends_in_repetition(req.output_ids, detection):
            req.stop_reason = REPETITION_STOP_REASON
            return RequestStatus.FINISHED_STOPPED
        return None

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req)


def _is_stop_token(req: Request, token: int) -> bool:
    return req.stop_reason == token or (token == req.eos_token_id and not req.params.ignore_eos)


def ends_in_repetition(token_ids: Sequence[int], detection: RepetitionDetection) -> bool:
    """Whether `token_ids` ends with some pattern of min..max_pattern_size tokens repeated min_count times."""
    count, n = detection.min_count, len(token_ids)
    if count < 2:
        return False
    for size in range(max(detection.min_pattern_size, 1), detection.max_pattern_size + 1):
        if size * count > n:
            break
        # the last size * count ids have period `size`: each equals the one `size` before it
        if all(token_ids[n - 1 - j] == token_ids[n - 1 - j - size] for j in range(size * (count - 1))):
            return True
    return False
