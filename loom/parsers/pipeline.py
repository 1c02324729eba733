"""One choice's parsing pipeline: the reasoning parser first, then the tool parser on its content.

Owns the order (tool calls are read in the answer, never in the thinking) and merging the two
parsers' deltas into one. Never reads an engine output or a request: serving feeds it text.
"""

from __future__ import annotations

from collections.abc import Sequence

from loom.parsers.registry import get_reasoning_parser, get_tool_parser
from loom.parsers.types import EMPTY_DELTA, ParsedDelta, ReasoningParser, ToolParser


def merge(first: ParsedDelta, second: ParsedDelta) -> ParsedDelta:
    if not first:
        return second
    if not second:
        return first
    return ParsedDelta(
        first.content + second.content,
        first.reasoning + second.reasoning,
        first.tool_calls + second.tool_calls,
    )


class ChoiceParser:
    """Text deltas in, content / reasoning / tool-call deltas out; either parser may be absent."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None) -> None:
        self._reasoning = reasoning
        self._tools = tools

    @property
    def markers(self) -> tuple[str, ...]:
        """The markup both parsers read: special tokens spelled so must reach them as text."""
        parsers = (self._reasoning, self._tools)
        return tuple(dict.fromkeys(m for p in parsers if p is not None for m in p.markers))

    @property
    def in_reasoning(self) -> bool:
        return self._reasoning is not None and self._reasoning.in_reasoning

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta:
        if self._reasoning is None:
            split = ParsedDelta(text_delta) if text_delta else EMPTY_DELTA
        else:
            split = self._reasoning.feed(text_delta, token_ids)
        return self._read_tools(split, final=False)

    def finish(self) -> ParsedDelta:
        split = self._reasoning.finish() if self._reasoning is not None else EMPTY_DELTA
        return self._read_tools(split, final=True)

    def _read_tools(self, split: ParsedDelta, *, final: bool) -> ParsedDelta:
        if self._tools is None:
            return split
        answer = self._tools.feed(split.content) if split.content else EMPTY_DELTA
        if final:
            answer = merge(answer, self._tools.finish())
        return merge(ParsedDelta("", split.reasoning), answer)


def make_choice_parser(
    tool_parser: str | None = None, reasoning_parser: str | None = None, *, prompt_text: str = ""
) -> ChoiceParser:
    """A pipeline for one choice from parser names (None: that parser is off)."""
    reasoning = get_reasoning_parser(reasoning_parser)(prompt_text=prompt_text) if reasoning_parser else None
    tools = get_tool_parser(tool_parser)() if tool_parser else None
    return ChoiceParser(reasoning, tools)
