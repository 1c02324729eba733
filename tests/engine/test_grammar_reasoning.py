"""The two-phase reasoning grammar: thinking is free until its end marker or its budget, the
budget forces the end marker, and the answer's constraint applies only after it."""

from __future__ import annotations

import torch

from loom.engine.grammar_reasoning import Phase, ReasoningPhases

VOCAB = [chr(c) for c in range(97, 123)] + ["</think>", "<think>", "{", "}"]  # one char (or marker) per token
END, START, OPEN, CLOSE = 26, 27, 28, 29


def ids(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


class OnlyBraces:
    """A toy answer constraint: exactly "{}"."""

    backend = "toy"

    def new_grammar(self) -> OnlyBraces.State:
        return OnlyBraces.State()

    class State:
        bitmask_words = 1

        def __init__(self) -> None:
            self.seen: list[int] = []

        def accept_tokens(self, token_ids: list[int]) -> bool:
            for t in token_ids:
                if t != (OPEN, CLOSE)[len(self.seen)] if len(self.seen) < 2 else True:
                    return False
                self.seen.append(t)
            return True

        def rollback(self, n: int) -> None:
            del self.seen[len(self.seen) - n :]

        def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
            bitmask[row].zero_()
            if len(self.seen) < 2:
                bitmask[row, 0] = 1 << (OPEN, CLOSE)[len(self.seen)]

        def is_terminated(self) -> bool:
            return len(self.seen) == 2

        def forced_tokens(self) -> list[int]:
            return []


def phases(**fields: object) -> ReasoningPhases:
    base: dict[str, object] = {
        "start_text": "<think>", "end_text": "</think>", "end_ids": (END,), "vocab_size": len(VOCAB),
        "decode": lambda t: VOCAB[t], "starts_inside": True,
    }  # fmt: skip
    return ReasoningPhases(**{**base, **fields})  # type: ignore[arg-type]


def allowed(grammar: object) -> set[int]:
    bitmask = torch.zeros((1, grammar.bitmask_words), dtype=torch.int32)  # type: ignore[attr-defined]
    grammar.fill_bitmask(bitmask, 0)  # type: ignore[attr-defined]
    word = int(bitmask[0, 0]) & 0xFFFFFFFF
    return {t for t in range(len(VOCAB)) if word >> t & 1}


def test_the_budget_forces_the_end_marker_then_frees_the_answer() -> None:
    g = phases(budget=3).new_grammar()
    assert g.accept_tokens(ids("abc"))
    assert g.phase == Phase.CLOSING and g.forced_tokens() == [END] and allowed(g) == {END}
    assert g.accept_tokens([END]) and g.phase == Phase.ANSWER
    assert allowed(g) == set(range(len(VOCAB))) and not g.is_terminated()


def test_the_model_may_close_the_block_itself() -> None:
    g = phases(budget=100).new_grammar()
    assert g.accept_tokens(ids("ab") + [END]) and g.phase == Phase.ANSWER


def test_the_answer_constraint_waits_for_the_thinking() -> None:
    g = phases(answer=OnlyBraces()).new_grammar()
    assert allowed(g) == set(range(len(VOCAB)))  # thinking: free
    assert g.accept_tokens(ids("xyz") + [END])
    assert allowed(g) == {OPEN}
    assert g.accept_tokens([OPEN, CLOSE]) and g.is_terminated()


def test_without_an_open_block_a_constraint_applies_at_once() -> None:
    g = phases(answer=OnlyBraces(), starts_inside=False).new_grammar()
    assert g.phase == Phase.ANSWER and allowed(g) == {OPEN}


def test_a_block_the_model_opens_counts_against_the_budget() -> None:
    g = phases(budget=2, starts_inside=False).new_grammar()
    assert g.accept_tokens([START]) and g.phase == Phase.THINKING
    assert g.accept_tokens(ids("ab")) and g.phase == Phase.CLOSING


def test_rollback_replays_to_the_same_state() -> None:
    g = phases(budget=3, answer=OnlyBraces()).new_grammar()
    g.accept_tokens(ids("abc") + [END, OPEN])
    g.rollback(2)
    assert g.phase == Phase.CLOSING
    g.rollback(1)
    assert g.phase == Phase.THINKING and g.num_thinking == 2
