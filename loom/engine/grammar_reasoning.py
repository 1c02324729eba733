"""Thinking first, then the answer's constraint: a grammar in two phases.

Owns `ReasoningPhases`, a `CompiledGrammar` that wraps a reasoning model's output:
- THINKING: any token, until the end marker (e.g. `</think>`) appears in the text, or until the
  thinking-token budget is spent; then the end marker is forced (fast-forwarded when the core
  fast-forwards, else one masked token a step) — the engine closes the thinking block;
- ANSWER: the answer's own constraint (a structured output or a forced tool call), or anything.
A request whose prompt did not open the block starts in BEFORE: without an answer constraint it
may open one (the start marker moves it to THINKING); with one, the constraint applies from the
first token. Markers are matched on the decoded text, so any tokenization of them counts.
Never decides the budget (serving does) and never reads HTTP.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loom.engine.grammar import CompiledGrammar, Grammar

_ALL_BITS = -1  # an int32 word with every bit set


class Phase(enum.IntEnum):
    BEFORE = 0
    THINKING = 1
    CLOSING = 2
    ANSWER = 3


@dataclass(frozen=True, slots=True)
class ReasoningPhases:
    start_text: str
    end_text: str
    end_ids: tuple[int, ...]  # the end marker as the tokenizer writes it (what closing forces)
    vocab_size: int
    decode: Callable[[int], str]  # one token's text
    budget: int | None = None  # thinking tokens before the block is closed; None = no limit
    answer: CompiledGrammar | None = None
    starts_inside: bool = False  # the prompt opened the block
    backend: str = "reasoning"

    def new_grammar(self) -> Grammar:
        return _PhasedGrammar(self)


class _PhasedGrammar:
    def __init__(self, spec: ReasoningPhases) -> None:
        self.spec = spec
        words = (spec.vocab_size + 31) // 32
        self.bitmask_words = spec.answer.new_grammar().bitmask_words if spec.answer is not None else words
        self.history: list[int] = []
        self._reset()

    def _reset(self) -> None:
        self.phase = Phase.THINKING if self.spec.starts_inside else Phase.BEFORE
        self.tail = ""  # recent text, long enough to hold a marker split across tokens
        self.num_thinking = 0
        self.num_closing = 0
        self.answer: Grammar | None = None
        if self.phase == Phase.BEFORE and self.spec.answer is not None:
            self._enter_answer()
        self._maybe_close()

    def _enter_answer(self) -> None:
        self.phase = Phase.ANSWER
        self.answer = self.spec.answer.new_grammar() if self.spec.answer is not None else None

    def _maybe_close(self) -> None:
        budget = self.spec.budget
        if self.phase == Phase.THINKING and budget is not None and self.num_thinking >= budget:
            self.phase, self.num_closing = Phase.CLOSING, 0

    def _accept_one(self, token: int) -> bool:
        if self.phase == Phase.ANSWER:
            return self.answer is None or self.answer.accept_tokens([token])
        if self.phase == Phase.CLOSING:
            if token != self.spec.end_ids[self.num_closing]:
                return False
            self.num_closing += 1
            if self.num_closing == len(self.spec.end_ids):
                self._enter_answer()
            return True
        self.tail = (self.tail + self.spec.decode(token))[-4 * max(len(self.spec.end_text), 8) :]
        if self.phase == Phase.BEFORE:
            if self.spec.start_text in self.tail:
                self.phase, self.tail = Phase.THINKING, ""
            return True
        self.num_thinking += 1
        if self.spec.end_text in self.tail:
            self._enter_answer()
        else:
            self._maybe_close()
        return True

    # -- the four verbs, and fast-forward

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        for token in token_ids:
            if not self._accept_one(token):
                return False
            self.history.append(token)
        return True

    def rollback(self, num_tokens: int) -> None:
        kept = self.history[: len(self.history) - num_tokens]
        self.history = []
        self._reset()
        self.accept_tokens(kept)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        if self.phase == Phase.ANSWER and self.answer is not None:
            self.answer.fill_bitmask(bitmask, row)
        elif self.phase == Phase.CLOSING:
            token = self.spec.end_ids[self.num_closing]
            bitmask[row].zero_()
            bitmask[row, token // 32] = torch.tensor(1 << (token % 32), dtype=torch.int64).to(torch.int32)
        else:
            bitmask[row].fill_(_ALL_BITS)

    def is_terminated(self) -> bool:
        return self.phase == Phase.ANSWER and self.answer is not None and self.answer.is_terminated()

    def forced_tokens(self) -> list[int]:
        if self.phase == Phase.CLOSING:
            return list(self.spec.end_ids[self.num_closing :])
        if self.phase == Phase.ANSWER and self.answer is not None:
            return self.answer.forced_tokens()
        return []
