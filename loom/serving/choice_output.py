"""One choice's raw text -> content, reasoning and tool calls, and its final `finish_reason`.

Owns the per-choice output plan (`OutputPlan`) and `ChoiceOutput`, which serving feeds with the
detokenized text of one choice, streamed or whole:
- free text (`auto` tools and/or a reasoning parser): the parsers of `loom.parsers` split it;
  with `parallel_tool_calls: false` only the first call is kept;
- a named function (`tool_choice: {"function": ...}`): the constrained text is the arguments
  object; it streams as argument fragments of call 0;
- `required`: the constrained text is a JSON array of calls, read as it streams (`required_calls`):
  each call's id and name once its name is written, then its `parameters` text as fragments.
`finish_reason` becomes "tool_calls" when a call was made and the choice ended on its own (a
named call keeps "stop", as OpenAI answers). Never touches the engine or HTTP.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from loom.parsers import ChoiceParser, ToolCallDelta, make_choice_parser
from loom.serving.required_calls import RequiredCallStream
from loom.serving.tools import ToolOptions
from loom.serving.types import ToolCallChunk, ToolCallResult


@dataclass(frozen=True, slots=True)
class OutputPlan:
    tools: ToolOptions | None = None
    tool_parser: str | None = None  # reads `auto` calls; None: tools are not parsed
    reasoning_parser: str | None = None
    include_reasoning: bool = True

    @property
    def is_plain(self) -> bool:
        return self.tools is None and self.reasoning_parser is None


@dataclass(frozen=True, slots=True)
class Piece:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallChunk, ...] = ()


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ChoiceOutput:
    plan: OutputPlan
    prompt_text: str = ""
    made_call: bool = False
    _buffer: list[str] = field(default_factory=list)
    _parser: ChoiceParser | None = None
    _required: RequiredCallStream = field(default_factory=lambda: RequiredCallStream(call_id))

    def __post_init__(self) -> None:
        tools = self.plan.tools
        if tools is None or tools.mode == "auto":
            tool_parser = self.plan.tool_parser if tools is not None else None
            self._parser = make_choice_parser(tool_parser, self.plan.reasoning_parser, prompt_text=self.prompt_text)
        elif self.plan.reasoning_parser is not None:  # a forced call is read in the answer, after the thinking
            self._parser = make_choice_parser(None, self.plan.reasoning_parser, prompt_text=self.prompt_text)

    @property
    def markers(self) -> tuple[str, ...]:
        return self._parser.markers if self._parser is not None else ()

    @property
    def _forced(self) -> bool:
        return self.plan.tools is not None and self.plan.tools.forced

    def feed(self, text: str) -> Piece:
        if self._parser is None:
            return self._forced_feed(text)
        parsed = self._parser.feed(text)
        if self._forced:
            return self._with_reasoning(self._forced_feed(parsed.content), parsed.reasoning)
        return self._piece(parsed.content, parsed.reasoning, parsed.tool_calls)

    def finish(self) -> Piece:
        if self._parser is None:
            return self._forced_finish()
        parsed = self._parser.finish()
        if self._forced:
            piece = self._forced_feed(parsed.content)
            tail = self._forced_finish()
            merged = Piece(piece.content + tail.content, "", piece.tool_calls + tail.tool_calls)
            return self._with_reasoning(merged, parsed.reasoning)
        return self._piece(parsed.content, parsed.reasoning, parsed.tool_calls)

    def _with_reasoning(self, piece: Piece, reasoning: str) -> Piece:
        return Piece(piece.content, reasoning if self.plan.include_reasoning else "", piece.tool_calls)

    def _forced_feed(self, text: str) -> Piece:
        tools = self.plan.tools
        assert tools is not None
        if tools.mode == "named" and text:
            first = not self.made_call
            self.made_call = True
            return Piece(
                tool_calls=(ToolCallChunk(0, call_id() if first else None, tools.named if first else None, text),)
            )
        if tools.mode == "required":
            self._buffer.append(text)
            chunks = self._required.feed(text)
            self.made_call = self.made_call or bool(chunks)
            return Piece(tool_calls=chunks)
        return Piece()

    def _forced_finish(self) -> Piece:
        tools = self.plan.tools
        assert tools is not None
        if tools.mode == "named":
            return Piece()
        if not self.made_call:  # cut short before any call was named: what was written is the content
            return Piece(content="".join(self._buffer))
        return Piece()

    def finish_reason(self, engine_reason: str | None) -> str | None:
        tools = self.plan.tools
        if engine_reason == "stop" and self.made_call and tools is not None and tools.mode != "named":
            return "tool_calls"
        return engine_reason

    def _piece(self, content: str, reasoning: str, calls: tuple[ToolCallDelta, ...]) -> Piece:
        tools = self.plan.tools
        chunks = tuple(ToolCallChunk(c.index, c.id, c.name, c.arguments_delta) for c in calls)
        if tools is not None and not tools.parallel:
            chunks = tuple(c for c in chunks if c.index == 0)
        self.made_call = self.made_call or bool(chunks)
        return Piece(content, reasoning if self.plan.include_reasoning else "", chunks)


def collect(output: ChoiceOutput, text: str) -> tuple[str, str | None, tuple[ToolCallResult, ...]]:
    """A whole choice's text -> (content, reasoning or None, finished calls)."""
    pieces = [output.feed(text), output.finish()]
    content = "".join(p.content for p in pieces)
    reasoning = "".join(p.reasoning for p in pieces)
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for chunk in (c for p in pieces for c in p.tool_calls):
        if chunk.id is not None and chunk.name is not None:
            heads[chunk.index] = (chunk.id, chunk.name)
        calls.setdefault(chunk.index, []).append(chunk.arguments)
    results = tuple(ToolCallResult(*heads[i], "".join(calls[i])) for i in sorted(calls) if i in heads)
    has_reasoning = output.plan.reasoning_parser is not None and output.plan.include_reasoning
    return content, reasoning if has_reasoning and reasoning else None, results
