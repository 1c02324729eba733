"""The thinking-token budget, and the two-phase grammar that enforces it and lets a constraint
apply to the answer only.

Owns how `reasoning_effort` and vLLM's `thinking_token_budget` become a budget, and building the
engine's `ReasoningPhases` from the server's reasoning parser (its markers), the rendered prompt
(did the template open the block?) and the answer's compiled constraint. Never touches HTTP.
"""

from __future__ import annotations

from loom.engine.grammar import CompiledGrammar
from loom.engine.grammar_reasoning import ReasoningPhases
from loom.parsers import get_reasoning_parser
from loom.tokenizer import Tokenizer

# Thinking tokens per reasoning_effort; "xhigh" and "max" (and no effort) set no budget.
EFFORT_BUDGETS: dict[str, int] = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384}


def thinking_budget(effort: str | None, explicit: int | None) -> int | None:
    """An explicit `thinking_token_budget` wins; else the effort's; None = no budget."""
    if explicit is not None:
        return explicit
    return EFFORT_BUDGETS.get(effort) if effort is not None else None


def reasoning_phases(
    parser_name: str, prompt_text: str, tok: Tokenizer, budget: int | None, answer: CompiledGrammar | None
) -> ReasoningPhases | None:
    """The phased grammar, or None when there is nothing to enforce (no budget, no constraint)."""
    if budget is None and answer is None:
        return None
    parser = get_reasoning_parser(parser_name)(prompt_text=prompt_text)
    start, end = parser.markers[:2]
    return ReasoningPhases(
        start_text=start,
        end_text=end,
        end_ids=tuple(tok.encode(end, add_special_tokens=False)),
        vocab_size=tok.vocab_size,
        decode=lambda token: tok.decode([token]),
        budget=budget,
        answer=answer,
        starts_inside=parser.in_reasoning,
    )
