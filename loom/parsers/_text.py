"""Text helpers shared by the parsers: held-back marker prefixes, bracket scanning, call checks.

Owns the small pieces every streaming parser needs so each parser reads as its own grammar:
how much of a text's end may still begin a marker, where one bracketed value ends when it
arrives piece by piece, which JSON is a tool call, and the output bookkeeping of a tool parser
(whitespace around calls, call indexes and ids). Never decides a format: the parsers do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from loom.parsers.types import EMPTY_DELTA, ParsedDelta, ToolCallDelta, new_call_id

_NAME = re.compile(r"\S+")  # a function name is whatever the model wrote, minus whitespace


def held_suffix_len(text: str, markers: Sequence[str]) -> int:
    """The length of the longest end of `text` that is a proper prefix of one of `markers`."""
    best = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:size]):
                best = size
                break
    return best


def find_first(text: str, markers: Sequence[str]) -> tuple[int, str]:
    """The earliest of `markers` in `text` as (position, marker); (-1, "") when none occurs."""
    found = [(pos, marker) for marker in markers if (pos := text.find(marker)) >= 0]
    return min(found) if found else (-1, "")


class BracketScanner:
    """Finds where one bracketed value ends when its text arrives piece by piece.

    The first character fed must open a bracket. Brackets inside strings (delimited by any of
    `quotes`, backslash escapes honoured) do not count. The scanner does not check that bracket
    kinds match: the parser that reads the value does.
    """

    def __init__(self, quotes: str = '"') -> None:
        self._quotes = quotes
        self._depth = 0
        self._quote: str | None = None
        self._escaped = False
        self._parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def feed(self, chunk: str) -> int | None:
        """Takes `chunk`; returns the offset in it just past the value's end, or None (not yet)."""
        for pos, char in enumerate(chunk):
            if self._quote is not None:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == self._quote:
                    self._quote = None
            elif char in self._quotes:
                self._quote = char
            elif char in "[{(":
                self._depth += 1
            elif char in "]})":
                self._depth -= 1
                if self._depth <= 0:
                    self._parts.append(chunk[: pos + 1])
                    return pos + 1
        self._parts.append(chunk)
        return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_value(text: str) -> tuple[bool, Any]:
    """(True, value) when `text` is one JSON value (NaN and Infinity are not), else (False, None)."""
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False, None


def arguments_json(arguments: Any) -> str | None:
    """The arguments as JSON text of an object, or None when they are not an object.

    Arguments written as a string of JSON (as OpenAI sends them) are read through.
    """
    if isinstance(arguments, str):
        ok, arguments = json_value(arguments)
        if not ok:
            return None
    if not isinstance(arguments, dict):
        return None
    try:
        return json.dumps(arguments, ensure_ascii=False, allow_nan=False)
    except (ValueError, RecursionError):
        return None


def call_from_object(obj: Any, *, require_arguments: bool) -> tuple[str, str] | None:
    """(name, arguments JSON) when `obj` is a call `{"name": ..., "arguments"|"parameters": {...}}`."""
    if not isinstance(obj, dict):
        return None
    if "name" not in obj and isinstance(obj.get("function"), dict):
        obj = obj["function"]  # OpenAI's own shape, {"type": "function", "function": {...}}
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return None
    key = "arguments" if "arguments" in obj else "parameters"
    if key not in obj and require_arguments:
        return None
    arguments = arguments_json(obj.get(key, {}))
    return None if arguments is None else (name, arguments)


def calls_from_json(text: str, *, require_arguments: bool) -> list[tuple[str, str]] | None:
    """The calls in a JSON object or a non-empty list of them; None unless every item is a call."""
    ok, value = json_value(text)
    if not ok:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [call_from_object(item, require_arguments=require_arguments) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


class ToolOutput:
    """A tool parser's output so far: content and calls, taken once per feed.

    Whitespace that only separates calls from each other or from the content is dropped: the
    content's trailing whitespace is held until more content shows it was inside the text, a
    call drops it, and content right after a call loses its leading whitespace. With no call at
    all, `take(final=True)` gives the held whitespace back, so a plain answer is unchanged.
    """

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._content: list[str] = []
        self._calls: list[ToolCallDelta] = []
        self._held_space = ""
        self._after_call = False
        self.num_calls = 0

    def content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
        core = text.rstrip()
        if not core:
            self._held_space += text
            return
        self._content.append(self._held_space + core)
        self._held_space = text[len(core) :]

    def call(self, name: str, arguments: str) -> None:
        self._held_space = ""
        self._after_call = True
        self._calls.append(ToolCallDelta(self.num_calls, self._new_id(), name, arguments))
        self.num_calls += 1

    def take(self, *, final: bool = False) -> ParsedDelta:
        if final and self.num_calls == 0:
            self._content.append(self._held_space)
            self._held_space = ""
        content = "".join(self._content)
        calls = tuple(self._calls)
        self._content.clear()
        self._calls.clear()
        return ParsedDelta(content, "", calls) if content or calls else EMPTY_DELTA
