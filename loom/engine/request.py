"""The core-side `Request`: token ids, sampling params, status and the KV block table.

Text never lives here (the client side detokenizes). Counts follow one invariant:

    | prompt_ids | output_ids |        all_token_ids = prompt_ids + output_ids
    |<-- num_computed_tokens -->|      tokens whose K/V are in the cache
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch

from loom.engine.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.IntEnum):
    """Ordered: everything >= FINISHED_STOPPED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """What a client submits to the core."""

    req_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    priority: int = 0  # lower is served first (under the priority scheduling policy)
    cache_salt: str | None = None  # prefix-cache blocks are shared only between equal salts


class Request:
    def __init__(self, submitted: EngineRequest, eos_token_id: int | None) -> None:
        self.req_id = submitted.req_id
        self.prompt_ids = list(submitted.prompt_ids)
        self.output_ids: list[int] = []
        self.params = submitted.params
        self.priority = submitted.priority
        self.cache_salt = submitted.cache_salt
        self.eos_token_id = eos_token_id
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None  # the stop token id that ended it, if any
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.arrival = next(_arrival_counter)
        self.generator: torch.Generator | None = None
        if submitted.params.seed is not None:
            self.generator = torch.Generator().manual_seed(submitted.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def __repr__(self) -> str:
        return f"Request({self.req_id}, {self.status.name}, computed={self.num_computed_tokens}/{self.num_tokens})"
