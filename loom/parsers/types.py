"""The parsers' plain result types and the two parser protocols.

Owns what a parser returns (`ParsedDelta`, `ToolCallDelta`), the whole answer they add up to
(`ParsedOutput`, `ToolCall`, `collect`), and the verbs every parser speaks. Never imports HTTP
schemas or serving types: serving converts these into its own message and chunk shapes.

Tool-call deltas follow OpenAI's streaming semantics: the first delta of a call carries its
`index`, a fresh `id` (`call_...`, unique within a response) and the function `name`; every delta
of that index carries an `arguments_delta`, and the deltas' fragments concatenated are the whole
JSON arguments text. Indexes count from 0 within one choice, in the order the calls appear.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int  # the call's position among this choice's calls, from 0
    id: str | None  # set on the call's first delta only
    name: str | None  # set on the call's first delta only (the call's type is always "function")
    arguments_delta: str  # a fragment of the JSON arguments text


@dataclass(frozen=True, slots=True)
class ParsedDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


EMPTY_DELTA = ParsedDelta()


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    """A whole choice: what a blocking response puts in its message."""

    content: str
    reasoning: str
    tool_calls: tuple[ToolCall, ...]


def collect(deltas: Iterable[ParsedDelta]) -> ParsedOutput:
    """Adds up one choice's deltas (the blocking answer is the sum of the streamed one)."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, tuple[str, str, list[str]]] = {}
    for delta in deltas:
        content.append(delta.content)
        reasoning.append(delta.reasoning)
        for call in delta.tool_calls:
            if call.index not in calls:
                calls[call.index] = (call.id or "", call.name or "", [])
            calls[call.index][2].append(call.arguments_delta)
    return ParsedOutput(
        content="".join(content),
        reasoning="".join(reasoning),
        tool_calls=tuple(ToolCall(i, n, "".join(a)) for _, (i, n, a) in sorted(calls.items())),
    )


def new_call_id() -> str:
    """`call_` + 24 random hex digits: unique within a response by chance (96 bits)."""
    return "call_" + uuid.uuid4().hex[:24]


class ReasoningParser(Protocol):
    """One choice's output split into reasoning and content; stateful, one instance per choice.

    `feed` takes each text delta as it is detokenized (token ids where a parser needs them) and
    returns what is certain now; text that may be the start of a marker is held back. `finish`
    ends the choice and returns everything still held. The sum of all returned deltas is the
    same however the text was cut into deltas.
    """

    @property
    def markers(self) -> tuple[str, ...]: ...  # the markup it reads: keep these in its text

    @property
    def in_reasoning(self) -> bool: ...  # True while the output is inside the thinking block

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta: ...

    def finish(self) -> ParsedDelta: ...


class ToolParser(Protocol):
    """One choice's content split into content and tool calls; same contract as ReasoningParser.

    Markup that does not parse as a call comes back as content, unchanged: never an exception,
    never lost text. Whitespace that only separates calls from each other or from the content is
    dropped; an answer with no call comes back exactly as written.
    """

    @property
    def markers(self) -> tuple[str, ...]: ...  # the markup it reads: keep these in its text

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta: ...

    def finish(self) -> ParsedDelta: ...


class ToolParserFactory(Protocol):
    def __call__(self) -> ToolParser: ...


class ReasoningParserFactory(Protocol):
    """`prompt_text` is the rendered prompt: a template that opened the thinking block itself
    (the prompt ends inside `<think>`) makes the output start inside reasoning."""

    def __call__(self, *, prompt_text: str = "") -> ReasoningParser: ...
