"""Hermes / Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated.

Owns reading that markup from a stream of text deltas. Text outside the tags is content. A call
ends at `</tool_call>`, at the next `<tool_call>` (models sometimes omit the closing tag between
calls) or at the end of the output; its body must be a JSON call object (or a list of them),
else the whole markup comes back as content exactly as written. Never raises on model output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from loom.parsers._text import ToolOutput, calls_from_json, find_first, held_suffix_len
from loom.parsers.types import ParsedDelta, new_call_id

START = "<tool_call>"
END = "</tool_call>"


class HermesToolParser:
    markers = (START, END)

    def __init__(self, *, new_id: Callable[[], str] = new_call_id) -> None:
        self._out = ToolOutput(new_id)
        self._buf = ""  # text not yet consumed: at most a partial marker between feeds
        self._body: str | None = None  # inside a call: its text so far; None outside

    def feed(self, text_delta: str, token_ids: Sequence[int] = ()) -> ParsedDelta:
        self._buf += text_delta
        while self._buf and self._step():
            pass
        return self._out.take()

    def finish(self) -> ParsedDelta:
        if self._body is None:
            self._out.content(self._buf)  # a partial marker at the very end is plain text
        else:
            self._body += self._buf
            self._end_call(closed=False)
        self._buf = ""
        return self._out.take(final=True)

    def _step(self) -> bool:
        """Consumes what it can of the buffer; False when it needs more text."""
        if self._body is None:
            pos = self._buf.find(START)
            if pos < 0:
                self._keep_partial((START,), into_body=False)
                return False
            self._out.content(self._buf[:pos])
            self._buf = self._buf[pos + len(START) :]
            self._body = ""
            return True
        pos, marker = find_first(self._buf, (END, START))
        if pos < 0:
            self._keep_partial((END, START), into_body=True)
            return False
        self._body += self._buf[:pos]
        # A closing tag is consumed with its call; an opening one is left to start the next call.
        self._buf = self._buf[pos + len(END) :] if marker == END else self._buf[pos:]
        self._end_call(closed=marker == END)
        return True

    def _keep_partial(self, markers: tuple[str, ...], *, into_body: bool) -> None:
        cut = len(self._buf) - held_suffix_len(self._buf, markers)
        if into_body:
            self._body = (self._body or "") + self._buf[:cut]
        else:
            self._out.content(self._buf[:cut])
        self._buf = self._buf[cut:]

    def _end_call(self, *, closed: bool) -> None:
        body = self._body or ""
        self._body = None
        calls = calls_from_json(body.strip(), require_arguments=False)
        if calls is None:
            self._out.content(START + body + (END if closed else ""))
            return
        for name, arguments in calls:
            self._out.call(name, arguments)
