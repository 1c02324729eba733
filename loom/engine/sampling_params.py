"""`SamplingParams`: how one engine request chooses, stops and reports its tokens.

Owns the engine-side, already-validated form of the sampling fields. The API layer converts the
wire request into this; the engine never sees HTTP names or raw JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loom.engine.grammar import CompiledGrammar


@dataclass(frozen=True, slots=True)
class RepetitionDetection:
    """End generation once the output's tail repeats a pattern of min..max tokens `min_count` times."""

    max_pattern_size: int
    min_pattern_size: int = 1
    min_count: int = 2


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None = until the context window is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None = off
    min_p: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # penalties and masks (see loom/engine/logits_processors.py for their order and semantics)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias in -100..100)
    allowed_token_ids: tuple[int, ...] | None = None  # None = every token allowed
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences that must never be completed
    # reporting
    logprobs: int | None = None  # None = off; k >= 0 = the sampled token's logprob plus the top k
    prompt_logprobs: int | None = None  # None = off; k >= 0 = per prompt token, plus the top k
    repetition_detection: RepetitionDetection | None = None
    # structured outputs: a grammar compiled by serving (loom/serving/structured.py); each engine
    # request gets its own state of it, and ends with "stop" once the grammar is complete
    grammar: CompiledGrammar | None = None

    def __post_init__(self) -> None:
        # the API validates user input; these guard engine callers (tests, bench, future front-ends)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
