"""The core-side `Request`: token ids, sampling params, status and the KV block table.

Text never lives here (the client side detokenizes). Counts follow one invariant:

    | prompt_ids | output_ids |        all_token_ids = prompt_ids + output_ids
    |<-- num_computed_tokens -->|      tokens whose K/V are in the cache
"""

from __future__ import annotations

import enum
import itertools
import random
from dataclasses import dataclass

import torch

from loom.engine.grammar import Grammar
from loom.engine.logprobs import TokenLogprob
from loom.engine.sampling_params import SamplingParams
from loom.engine.sampling_rows import PenaltyTracker, RowSampling

_arrival_counter = itertools.count()


class RequestStatus(enum.IntEnum):
    """Ordered: everything >= FINISHED_STOPPED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6  # its own work raised: it alone ends, the step goes on for the others

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
    RequestStatus.FINISHED_ERROR: "error",
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
        self.stop_reason: int | str | None = None  # the stop token id that ended it, or "repetition_detected"
        self.block_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_hashes: list[bytes] = []  # chained content hashes of its full blocks (kv_cache.py)
        self.arrival = next(_arrival_counter)
        self.generator = None if submitted.params.seed is None else seeded_generator(submitted.params.seed)
        # built at admission by `admit_sampling` (a failure there fails this request only)
        self.sampling: RowSampling | None = None
        self.penalties: PenaltyTracker | None = None  # distinct seen tokens and output counts
        # structured outputs: has accepted exactly `output_ids` (a recompute after preemption re-accepts nothing)
        self.grammar: Grammar | None = None
        # the runner fills this across prefill chunks: entry i is prompt token i + 1 under position i
        self.prompt_logprobs: list[TokenLogprob] | None = None if submitted.params.prompt_logprobs is None else []

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def take_prompt_logprobs(self) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt's logprobs (first entry None), for the request's first output only."""
        if self.prompt_logprobs is None or len(self.output_ids) != 1:
            return None
        return (None, *self.prompt_logprobs)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]

    def __repr__(self) -> str:
        return f"Request({self.req_id}, {self.status.name}, computed={self.num_computed_tokens}/{self.num_tokens})"


_MT_STATE_OFFSET = 24  # torch's CPU generator state: u64 seed, i32 left, i32 seeded, u64 next, then 624 u64 words
_MT_STATE_WORDS = 624


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator whose whole mt19937 state depends on all 64 bits of `seed` (any int64 or uint64).

    `manual_seed` keeps only the low 32 bits (seed, seed + 2**32 and seed + 2**63 give one stream),
    so the state words come from Python's `random`, which seeds mt19937 from the whole integer
    (`init_by_array`). The int64 seed maps to a distinct uint64 first (two's complement).
    """
    seed_u64 = seed & 0xFFFF_FFFF_FFFF_FFFF
    generator = torch.Generator().manual_seed(seed_u64)  # sets seed, left = 1, next = 0
    words = random.Random(seed_u64).getstate()[1][:_MT_STATE_WORDS]
    state = generator.get_state()
    end = _MT_STATE_OFFSET + 8 * _MT_STATE_WORDS
    state[_MT_STATE_OFFSET:end].view(torch.int64).copy_(torch.tensor(words, dtype=torch.int64))
    return generator.set_state(state)
