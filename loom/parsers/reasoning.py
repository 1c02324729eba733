"""Reasoning parsers: a thinking block (`<think>...</think>`, Mistral's `[THINK]...[/THINK]`) at
the start of the output becomes reasoning, the rest content.

Owns the three ways a block begins: the model opens it itself (Qwen3, SmolLM3), the template
opened it at the end of the prompt so the output starts inside it and only the closing marker
appears (DeepSeek-R1, QwQ, Qwen3 thinking models; seen in `prompt_text`), or there is none (the
output is all content). The whitespace just inside the block and just after it is dropped.
A block that never closes is all reasoning. Never looks for a block after the start of the
output, and never raises on model output.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from loom.parsers._text import held_suffix_len
from loom.parsers.types import EMPTY_DELTA, ParsedDelta


class _State(enum.Enum):
    MAYBE = enum.auto()  # at the start: the model may still open a block
    REASONING = enum.auto()
    CONTENT = enum.auto()


class _Trimmed:
    """A run of text emitted as it grows, without its leading and trailing whitespace."""

    def __init__(self) -> None:
        self._started = False
        self._space = ""  # trailing whitespace held until more text shows it is inside

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        core = text.rstrip()
        if not core:
            self._space += text
            return ""
        out = self._space + core
        self._space = text[len(core) :]
        return out


def block_open_at_end(prompt_text: str, start_marker: str, end_marker: str) -> bool:
    """Whether the prompt leaves a thinking block open (its last opening marker is not closed)."""
    return prompt_text.rfind(start_marker) > prompt_text.rfind(end_marker)


class ThinkReasoningParser:
    def __init__(self, start_marker: str = "<think>", end_marker: str = "</think>", *, in_reasoning: bool) -> None:
        self.start_marker = start_marker
        self.end_marker = end_marker
        self._state = _State.REASONING if in_reasoning else _State.MAYBE
        self._at_start = in_reasoning  # the model may still repeat the opening marker the prompt has
        self._buf = ""
        self._reasoning = _Trimmed()
        self._content_started = False  # leading whitespace after the block is dropped until then
        self._out_reasoning: list[str] = []
        self._out_content: list[str] = []

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.start_marker, self.end_marker)

    @property
    def in_reasoning(self) -> bool:
        return self._state is _State.REASONING

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta:
        self._buf += text_delta
        while self._buf and self._step():
            pass
        return self._take()

    def finish(self) -> ParsedDelta:
        if self._state is _State.REASONING:
            self._out_reasoning.append(self._reasoning.push(self._buf))  # held whitespace is dropped
        else:
            self._content_started |= self._state is _State.MAYBE  # no block: content as written
            self._emit_content(self._buf)
        self._buf = ""
        return self._take()

    def _step(self) -> bool:
        """Consumes what it can of the buffer; False when it needs more text."""
        if self._state is _State.MAYBE:
            return self._maybe_open()
        if self._state is _State.REASONING:
            return self._skip_repeated_open() if self._at_start else self._reason()
        self._emit_content(self._buf)
        self._buf = ""
        return False

    def _maybe_open(self) -> bool:
        text = self._buf.lstrip()
        if not text or (self.start_marker.startswith(text) and text != self.start_marker):
            return False
        if text.startswith(self.start_marker):
            self._buf = text[len(self.start_marker) :]
            self._state = _State.REASONING
        else:
            self._state = _State.CONTENT
            self._content_started = True  # no block: the content is exactly what was written
        return True

    def _skip_repeated_open(self) -> bool:
        text = self._buf.lstrip()
        if not text or (self.start_marker.startswith(text) and text != self.start_marker):
            return False
        if text.startswith(self.start_marker):
            self._buf = text[len(self.start_marker) :]
        self._at_start = False
        return True

    def _reason(self) -> bool:
        pos = self._buf.find(self.end_marker)
        if pos < 0:
            cut = len(self._buf) - held_suffix_len(self._buf, (self.end_marker,))
            self._out_reasoning.append(self._reasoning.push(self._buf[:cut]))
            self._buf = self._buf[cut:]
            return False
        self._out_reasoning.append(self._reasoning.push(self._buf[:pos]))
        self._buf = self._buf[pos + len(self.end_marker) :]
        self._state = _State.CONTENT
        return True

    def _emit_content(self, text: str) -> None:
        if not self._content_started:
            text = text.lstrip()
            self._content_started = bool(text)
        self._out_content.append(text)

    def _take(self) -> ParsedDelta:
        content, reasoning = "".join(self._out_content), "".join(self._out_reasoning)
        self._out_content.clear()
        self._out_reasoning.clear()
        return ParsedDelta(content, reasoning) if content or reasoning else EMPTY_DELTA


def qwen3(*, prompt_text: str = "") -> ThinkReasoningParser:
    """`<think>` opened by the model, or by the template when the prompt ends inside a block."""
    return ThinkReasoningParser(in_reasoning=block_open_at_end(prompt_text, "<think>", "</think>"))


def deepseek_r1(*, prompt_text: str = "") -> ThinkReasoningParser:
    """The output starts inside `<think>` (R1's template opens it) unless the prompt closed it."""
    closed = prompt_text.rstrip().endswith("</think>")
    return ThinkReasoningParser(in_reasoning=not closed)


def mistral(*, prompt_text: str = "") -> ThinkReasoningParser:
    """Magistral's `[THINK]...[/THINK]`."""
    in_reasoning = block_open_at_end(prompt_text, "[THINK]", "[/THINK]")
    return ThinkReasoningParser("[THINK]", "[/THINK]", in_reasoning=in_reasoning)
