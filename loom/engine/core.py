"""The engine core: one `step()` = schedule -> run the model -> sample -> update.

Owns the scheduler, runner and sampler of one model. Runs on its own thread (see
`async_engine`); everything here is synchronous and token-ids only.

Logprobs ride along: the sampler returns one `TokenLogprob` per row that asked, `update` puts it
on that request's `CoreOutput`; prompt logprobs are collected by the runner on the `Request` and
leave with its first `CoreOutput`.
"""

from __future__ import annotations

import torch

from loom.engine.request import EngineRequest, Request
from loom.engine.runner import ModelRunner
from loom.engine.sampler import Sampler
from loom.engine.scheduler import CoreOutput, Scheduler


class EngineCore:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, eos_token_id: int | None) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.sampler = Sampler()
        self.eos_token_id = eos_token_id

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, submitted: EngineRequest) -> None:
        self.scheduler.add(Request(submitted, self.eos_token_id))

    def abort_request(self, req_id: str) -> None:
        self.scheduler.abort(req_id)

    @torch.inference_mode()
    def step(self) -> list[CoreOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        logits, reqs = self.runner.execute(sched)
        out = self.sampler.sample(logits, reqs)
        sampled = {r.req_id: t for r, t in zip(reqs, out.token_ids, strict=True)}
        logprobs = None
        if out.logprobs is not None:
            logprobs = {r.req_id: lp for r, lp in zip(reqs, out.logprobs, strict=True) if lp is not None}
        return self.scheduler.update(sched, sampled, logprobs)
