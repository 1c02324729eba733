"""Calls written as bracketed values after an optional marker (Llama 3 JSON, pythonic lists).

Owns the stream grammar both formats share: a call section opens with the format's marker
anywhere in the text (`<|python_tag|>`, `<|python_start|>`), or with the value's opening bracket
as the very first thing the model writes; then one or more values, each a call (or a list of
calls), separated by whitespace or the format's separators; an optional end marker closes the
section. A value that is not calls comes back as content with the markup before it, exactly as
written, and the rest of the output is read as content (where the marker may open a section
again). Never parses a value itself: each format hands in its own `parse`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loom.parsers._text import BracketScanner, ToolOutput, held_suffix_len
from loom.parsers.types import ParsedDelta, new_call_id


@dataclass(frozen=True, slots=True)
class CallSyntax:
    marker: str  # opens a call section anywhere in the text
    opener: str  # the first character of a value; opens a section at the very start too
    quotes: str  # string delimiters inside a value
    separators: str  # characters allowed between two values, besides whitespace
    end_marker: str | None  # closes a section; dropped
    parse: Callable[[str], list[tuple[str, str]] | None]  # a value's text -> [(name, arguments JSON)]


class _State(enum.Enum):
    START = enum.auto()  # nothing but whitespace yet: a bare opener may still begin a section
    CONTENT = enum.auto()  # plain text, watching for the marker
    EXPECT = enum.auto()  # inside a section, before a value
    VALUE = enum.auto()  # inside a value, waiting for its closing bracket
    AFTER = enum.auto()  # after a value of calls: a separator, another value, or the end


class MarkedCallParser:
    def __init__(self, syntax: CallSyntax, *, new_id: Callable[[], str] = new_call_id) -> None:
        self._syntax = syntax
        self._out = ToolOutput(new_id)
        self._state = _State.START
        self._buf = ""  # text not yet consumed
        self._raw = ""  # the section's markup since its last call: content again if no call follows
        self._scanner = BracketScanner(syntax.quotes)
        self._markers = tuple(m for m in (syntax.marker, syntax.end_marker) if m)

    @property
    def markers(self) -> tuple[str, ...]:
        return self._markers

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta:
        self._buf += text_delta
        while self._buf and self._step():
            pass
        return self._out.take()

    def finish(self) -> ParsedDelta:
        if self._state is _State.VALUE:  # the value never closed: it cannot be a call
            self._raw += self._scanner.text
        if self._state in (_State.EXPECT, _State.VALUE):
            self._give_back(dangling=self._raw + self._buf)
        elif self._state is not _State.AFTER or self._buf.strip():
            self._out.content(self._buf)
        self._buf = ""
        return self._out.take(final=True)

    def _step(self) -> bool:
        """Consumes what it can of the buffer; False when it needs more text."""
        match self._state:
            case _State.START:
                return self._start()
            case _State.CONTENT:
                return self._content()
            case _State.EXPECT:
                return self._expect()
            case _State.VALUE:
                return self._value()
            case _State.AFTER:
                return self._after()

    def _start(self) -> bool:
        text = self._buf.lstrip()
        if not text or (self._syntax.marker.startswith(text) and text != self._syntax.marker):
            return False
        if text.startswith(self._syntax.marker) or text[0] == self._syntax.opener:
            self._state = _State.EXPECT  # the leading whitespace joins the section's markup there
        else:
            self._state = _State.CONTENT
        return True

    def _content(self) -> bool:
        marker = self._syntax.marker
        pos = self._buf.find(marker)
        if pos < 0:
            cut = len(self._buf) - held_suffix_len(self._buf, (marker,))
            self._out.content(self._buf[:cut])
            self._buf = self._buf[cut:]
            return False
        self._out.content(self._buf[:pos])
        self._raw, self._buf = marker, self._buf[pos + len(marker) :]
        self._state = _State.EXPECT
        return True

    def _expect(self) -> bool:
        text = self._skip_space()
        marker = self._syntax.marker
        if not text or (marker.startswith(text) and text != marker):
            return False
        if text.startswith(marker):
            self._raw, self._buf = self._raw + marker, text[len(marker) :]
        elif text[0] == self._syntax.opener:
            self._scanner = BracketScanner(self._syntax.quotes)
            self._state = _State.VALUE
        else:
            self._give_back()
        return True

    def _value(self) -> bool:
        end = self._scanner.feed(self._buf)
        if end is None:
            self._buf = ""
            return False
        self._buf = self._buf[end:]
        text = self._scanner.text
        calls = self._syntax.parse(text)
        if calls is None:
            self._raw += text
            self._give_back()
            return True
        for name, arguments in calls:
            self._out.call(name, arguments)
        self._raw = ""
        self._state = _State.AFTER
        return True

    def _after(self) -> bool:
        text = self._skip_space()
        if not text:
            return False
        end_marker = self._syntax.end_marker
        if end_marker and text.startswith(end_marker):
            self._buf = text[len(end_marker) :]  # dropped: it only closes the section
        elif text[0] in self._syntax.separators:
            self._raw, self._buf = self._raw + text[0], text[1:]
            self._state = _State.EXPECT
        elif text.startswith(self._syntax.marker) or text[0] == self._syntax.opener:
            self._state = _State.EXPECT
        elif any(m.startswith(text) for m in self._markers):
            return False
        else:
            self._give_back()
        return True

    def _skip_space(self) -> str:
        text = self._buf.lstrip()
        self._raw += self._buf[: len(self._buf) - len(text)]
        self._buf = text
        return text

    def _give_back(self, dangling: str | None = None) -> None:
        """The section's markup was not a call after all: content, and the rest is read as such."""
        raw = self._raw if dangling is None else dangling
        # Separators and markers left after the last call of a section are markup, not text.
        if dangling is None or self._out.num_calls == 0 or self._has_text(raw):
            self._out.content(raw)
        self._raw = ""
        self._state = _State.CONTENT

    def _has_text(self, raw: str) -> bool:
        for marker in self._markers:
            raw = raw.replace(marker, "")
        return bool(raw.strip().strip(self._syntax.separators).strip())
