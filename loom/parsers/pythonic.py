"""Pythonic tool calls (Llama 3.2 / Llama 4 templates): `[get_weather(city="Paris"), f(a=1)]`.

Owns that format's syntax and reading it safely: the list is parsed with `ast` and every
argument must be a keyword with a literal value (strings, numbers, booleans, None, and lists,
tuples and dicts of them; `true` / `false` / `null` are read as JSON's), so nothing the model
writes is ever evaluated. A call section opens with `<|python_start|>` anywhere or `[` as the
first thing the model writes, and `<|python_end|>` may close it. Anything else (positional
arguments, expressions, names) is not a call and comes back as content. Never raises on model
output.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from typing import Any

from loom.parsers.marked_calls import CallSyntax, MarkedCallParser
from loom.parsers.types import new_call_id

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"
_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


class _NotLiteral(Exception):
    pass


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, str | int | float | bool | type(None)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _literal(node.operand)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        keys = [None if key is None else _literal(key) for key in node.keys]
        if all(isinstance(key, str) for key in keys):
            return dict(zip(keys, (_literal(v) for v in node.values), strict=True))
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotLiteral


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _dotted_name(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _call(node: ast.expr) -> tuple[str, str]:
    if not isinstance(node, ast.Call) or node.args:
        raise _NotLiteral
    name = _dotted_name(node.func)
    if name is None or any(kw.arg is None for kw in node.keywords):  # `**kwargs`
        raise _NotLiteral
    arguments = {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    return name, json.dumps(arguments, ensure_ascii=False, allow_nan=False)


def parse_calls(text: str) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] for a non-empty list of literal calls; None for anything else."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        return [_call(node) for node in tree.body.elts]
    except (_NotLiteral, SyntaxError, ValueError, RecursionError, MemoryError):
        return None


SYNTAX = CallSyntax(
    marker=PYTHON_START, opener="[", quotes="\"'", separators="", end_marker=PYTHON_END, parse=parse_calls
)


class PythonicToolParser(MarkedCallParser):
    def __init__(self, *, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(SYNTAX, new_id=new_id)
