"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}` (or `"arguments"`).

Owns that format's syntax: a call section opens with `<|python_tag|>` anywhere or with `{` as
the first thing the model writes; calls are separated by `;` (or only whitespace). An object
without a string `name` and an object of `parameters` / `arguments` is not a call: a model
answering in plain JSON keeps its answer as content. `<|python_tag|>` followed by code (Llama's
built-in tools) is content too. Never raises on model output.
"""

from __future__ import annotations

from collections.abc import Callable

from loom.parsers._text import calls_from_json
from loom.parsers.marked_calls import CallSyntax, MarkedCallParser
from loom.parsers.types import new_call_id

PYTHON_TAG = "<|python_tag|>"


def _parse(text: str) -> list[tuple[str, str]] | None:
    # One object per value: a list at the start of an answer is far more often data than calls.
    if not text.startswith("{"):
        return None
    return calls_from_json(text, require_arguments=True)


SYNTAX = CallSyntax(marker=PYTHON_TAG, opener="{", quotes='"', separators=";", end_marker=None, parse=_parse)


class Llama3JsonToolParser(MarkedCallParser):
    def __init__(self, *, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(SYNTAX, new_id=new_id)
