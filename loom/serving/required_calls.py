"""`tool_choice: "required"` output, read as it streams: `[{"name": ..., "parameters": {...}}, ...]`.

Owns turning the constrained text (a JSON array of call objects; the grammar guarantees its shape)
into OpenAI-shaped call deltas while it is written: a call's first delta (index, id, name) as soon
as its name string closes, then the `parameters` value's text as argument fragments as each piece
arrives, so the fragments concatenate to exactly that JSON text. A call whose `parameters` came
before its `name` (no grammar of ours writes that) sends them with its first delta; a call without
`parameters` sends `{}` when its object closes. Text cut short (`length`) leaves the last call's
arguments unfinished, as OpenAI's streams do. Never raises on text it does not expect: it only
reads keys at the top level of each call object and ignores the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from loom.serving.types import ToolCallChunk


@dataclass(slots=True)
class _Call:
    index: int
    id: str
    name: str | None = None  # set when its name string closes, and its first delta sent then
    pending_args: list[str] = field(default_factory=list)  # arguments seen before the name
    had_args: bool = False


@dataclass(slots=True)
class RequiredCallStream:
    new_id: Callable[[], str]
    calls: list[_Call] = field(default_factory=list)
    _depth: int = 0  # JSON nesting: 1 inside the array, 2 inside a call object
    _in_string: bool = False
    _escaped: bool = False
    _token: list[str] = field(default_factory=list)  # the string being read at depth 2 (a key or the name)
    _key: str | None = None  # the last key read at depth 2
    _expect: str = "key"  # depth 2: "key", "colon", "value"
    _args_depth: int | None = None  # depth at which the parameters value started, while inside it
    _args_started: bool = False  # its first non-blank character was read

    def feed(self, text: str) -> tuple[ToolCallChunk, ...]:
        out: list[ToolCallChunk] = []
        args: list[str] = []
        for ch in text:
            if self._args_depth is not None:
                keep = self._in_args(ch)
                if keep is None:  # blank before the value
                    continue
                if keep:
                    args.append(ch)
                    if self._args_depth is not None:
                        continue
                    self._flush(args, out)  # the value's closing bracket: the call's arguments are whole
                    continue
                self._flush(args, out)
            self._structure(ch, out)
        self._flush(args, out)
        return tuple(out)

    # -- inside the parameters value: pass characters through, track where it ends

    def _in_args(self, ch: str) -> bool | None:
        """True if `ch` belongs to the parameters value, False if it ends it (a scalar's `,` or `}`:
        read as structure), None for blanks before it; updates the scan state."""
        if self._in_string:
            self._string_char(ch)
            return True
        if not self._args_started:
            if ch.isspace():
                return None
            self._args_started = True
        if ch == '"':
            self._in_string = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            if self._depth == self._args_depth:  # a scalar value, ended by its call's closing brace
                self._args_depth = None
                return False
            self._depth -= 1
            if self._depth == self._args_depth:  # the value's own closing bracket
                self._args_depth = None
        elif ch == "," and self._depth == self._args_depth:
            self._args_depth = None
            return False
        return True

    def _flush(self, args: list[str], out: list[ToolCallChunk]) -> None:
        if not args or not self.calls:
            args.clear()
            return
        call = self.calls[-1]
        call.had_args = True
        fragment = "".join(args)
        args.clear()
        if call.name is not None:
            out.append(ToolCallChunk(call.index, None, None, fragment))
        else:
            call.pending_args.append(fragment)

    # -- the array and the call objects

    def _structure(self, ch: str, out: list[ToolCallChunk]) -> None:
        if self._in_string:
            if not self._string_char(ch) and self._depth == 2:
                self._token_closed(out)
            elif self._depth == 2:
                self._token.append(ch)
            return
        if ch == '"':
            self._in_string = True
            self._token.clear()
        elif ch == "{":
            self._depth += 1
            if self._depth == 2:
                self.calls.append(_Call(len(self.calls), self.new_id()))
                self._expect, self._key = "key", None
        elif ch == "[":
            self._depth += 1
        elif ch in "}]":
            if ch == "}" and self._depth == 2 and self.calls:
                self._call_closed(self.calls[-1], out)
            self._depth -= 1
        elif self._depth == 2 and ch == ":":
            self._expect = "value"
            if self._key == "parameters":
                self._args_depth, self._args_started = self._depth, False
        elif self._depth == 2 and ch == ",":
            self._expect = "key"

    def _string_char(self, ch: str) -> bool:
        """Consumes one character inside a string; False when it closes the string."""
        if self._escaped:
            self._escaped = False
        elif ch == "\\":
            self._escaped = True
        elif ch == '"':
            self._in_string = False
            return False
        return True

    def _token_closed(self, out: list[ToolCallChunk]) -> None:
        raw = '"' + "".join(self._token) + '"'
        try:
            value = json.loads(raw)
        except ValueError:
            value = "".join(self._token)
        if self._expect == "key":
            self._key, self._expect = value, "colon"
        elif self._expect == "value" and self._key == "name" and self.calls:
            call = self.calls[-1]
            call.name = value
            self._announce(call, out)
        self._token.clear()

    def _announce(self, call: _Call, out: list[ToolCallChunk]) -> None:
        out.append(ToolCallChunk(call.index, call.id, call.name, "".join(call.pending_args)))
        call.pending_args.clear()

    def _call_closed(self, call: _Call, out: list[ToolCallChunk]) -> None:
        if call.name is None:  # an object without a name is no call
            return
        if not call.had_args:
            out.append(ToolCallChunk(call.index, None, None, "{}"))
