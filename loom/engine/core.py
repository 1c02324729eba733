"""The engine core: one `step()` = schedule -> run the model -> sample -> update.

Owns the scheduler, runner and sampler of one model. Runs on its own thread (see
`async_engine`); everything here is synchronous and token-ids only.
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
        tokens = self.sampler.sample(logits, reqs)
        return self.scheduler.update(sched, {r.req_id: t for r, t in zip(reqs, tokens, strict=True)})
