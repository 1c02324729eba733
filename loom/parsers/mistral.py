"""Mistral tool calls: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` and the newer
`[TOOL_CALLS]name[ARGS]{...}` (with an optional `[CALL_ID]id` before `[ARGS]`), repeated.

Owns reading both forms from a stream of text deltas. Text outside the markup is content; the
model's own call ids are not used (Loom's ids are `call_...`). Markup that is not a call comes
back as content exactly as written. Never raises on model output.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence

from loom.parsers._text import BracketScanner, ToolOutput, arguments_json, calls_from_json, held_suffix_len, json_value
from loom.parsers.types import ParsedDelta, new_call_id

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME_CHARS = re.compile(r"[\w.\-]*")
_ID_CHARS = re.compile(r"\w*")
_NAME_HEADER = re.compile(r"([\w.\-]+)(?:\[CALL_ID\]\w*)?\[ARGS\]")


class _State(enum.Enum):
    CONTENT = enum.auto()  # plain text, watching for [TOOL_CALLS]
    FORM = enum.auto()  # right after [TOOL_CALLS]: a JSON list/object, or a name
    NAME = enum.auto()  # reading `name[CALL_ID]id[ARGS]`
    ARGS = enum.auto()  # after [ARGS], before the arguments object
    VALUE = enum.auto()  # inside a JSON value, waiting for its closing bracket


def _may_become_header(text: str) -> bool:
    """Whether `text` is the beginning of some `name[CALL_ID]id[ARGS]`."""
    name_end = _NAME_CHARS.match(text).end()  # type: ignore[union-attr]  # matches "" at worst
    rest = text[name_end:]
    if not rest:
        return True
    if name_end == 0:
        return False
    if ARGS.startswith(rest) or CALL_ID.startswith(rest):
        return True
    if not rest.startswith(CALL_ID):
        return False
    after_id = rest[len(CALL_ID) :]
    tail = after_id[_ID_CHARS.match(after_id).end() :]  # type: ignore[union-attr]
    return ARGS.startswith(tail)


class MistralToolParser:
    markers = (TOOL_CALLS, ARGS, CALL_ID)

    def __init__(self, *, new_id: Callable[[], str] = new_call_id) -> None:
        self._out = ToolOutput(new_id)
        self._state = _State.CONTENT
        self._buf = ""  # text not yet consumed
        self._raw = ""  # the markup of the call being read: content again if it is not a call
        self._name: str | None = None  # the name-form call's name, once its header is read
        self._scanner = BracketScanner()

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta:
        self._buf += text_delta
        while self._buf and self._step():
            pass
        return self._out.take()

    def finish(self) -> ParsedDelta:
        if self._state is _State.VALUE:
            self._raw += self._scanner.text  # never closed: not a call
        self._out.content(self._raw + self._buf)
        self._raw = self._buf = ""
        return self._out.take(final=True)

    def _step(self) -> bool:
        """Consumes what it can of the buffer; False when it needs more text."""
        match self._state:
            case _State.CONTENT:
                return self._content()
            case _State.FORM:
                return self._form()
            case _State.NAME:
                return self._header()
            case _State.ARGS:
                return self._args()
            case _State.VALUE:
                return self._value()

    def _content(self) -> bool:
        pos = self._buf.find(TOOL_CALLS)
        if pos < 0:
            cut = len(self._buf) - held_suffix_len(self._buf, (TOOL_CALLS,))
            self._out.content(self._buf[:cut])
            self._buf = self._buf[cut:]
            return False
        self._out.content(self._buf[:pos])
        self._raw, self._buf = TOOL_CALLS, self._buf[pos + len(TOOL_CALLS) :]
        self._state = _State.FORM
        return True

    def _form(self) -> bool:
        text = self._skip_space()
        if not text:
            return False
        self._name = None
        self._state = self._open_value() if text[0] in "[{" else _State.NAME
        return True

    def _header(self) -> bool:
        match = _NAME_HEADER.match(self._buf)
        if match is not None:
            self._name = match.group(1)
            self._raw += self._buf[: match.end()]
            self._buf = self._buf[match.end() :]
            self._state = _State.ARGS
        elif _may_become_header(self._buf):
            return False
        else:
            self._give_back()
        return True

    def _args(self) -> bool:
        text = self._skip_space()
        if not text:
            return False
        if text[0] == "{":
            self._state = self._open_value()
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
        calls = self._calls(text)
        if calls is None:
            self._raw += text
            self._give_back()
            return True
        for name, arguments in calls:
            self._out.call(name, arguments)
        self._raw = ""
        self._state = _State.CONTENT
        return True

    def _calls(self, text: str) -> list[tuple[str, str]] | None:
        if self._name is None:
            return calls_from_json(text, require_arguments=False)
        ok, value = json_value(text)
        arguments = arguments_json(value) if ok else None
        return None if arguments is None else [(self._name, arguments)]

    def _open_value(self) -> _State:
        self._scanner = BracketScanner()
        return _State.VALUE

    def _skip_space(self) -> str:
        text = self._buf.lstrip()
        self._raw += self._buf[: len(self._buf) - len(text)]
        self._buf = text
        return text

    def _give_back(self) -> None:
        self._out.content(self._raw)
        self._raw = ""
        self._state = _State.CONTENT
