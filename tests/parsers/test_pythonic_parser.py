"""Pythonic tool calls `[f(a=1), g(b="x")]`: literal keyword arguments only, read with `ast`."""

from __future__ import annotations

import json

import pytest
from parser_cases import parse_every_way

from loom.parsers.pythonic import PythonicToolParser, parse_calls


def call(name: str, args: dict) -> tuple[str, str]:
    return name, json.dumps(args)


def test_a_list_of_calls() -> None:
    text = "[get_weather(city='Paris'), get_time(tz=\"UTC\", verbose=True)]"
    expected = ("", "", (call("get_weather", {"city": "Paris"}), call("get_time", {"tz": "UTC", "verbose": True})))
    assert parse_every_way(PythonicToolParser, text) == expected


def test_short_case_every_three_way_split() -> None:
    assert parse_every_way(PythonicToolParser, ' [f(s="a]b)c\'")] ok', three_way=True) == (
        "ok",
        "",
        (call("f", {"s": "a]b)c'"}),),
    )


def test_nested_literals_and_json_spellings() -> None:
    text = '[f(a=[1, {"k": None}], b=-2.5, c=null, d=true, e=(1, 2)), g()]'
    args = {"a": [1, {"k": None}], "b": -2.5, "c": None, "d": True, "e": [1, 2]}
    assert parse_every_way(PythonicToolParser, text)[2] == (call("f", args), call("g", {}))


def test_dotted_names_and_llama4_markers() -> None:
    text = "Let me see. <|python_start|>[math.sqrt(x=2)]<|python_end|> Done"
    assert parse_every_way(PythonicToolParser, text) == ("Let me see.Done", "", (call("math.sqrt", {"x": 2}),))


@pytest.mark.parametrize(
    "text",
    [
        "[f(1)]",
        "[f(a=1+2)]",
        '[f(a=__import__("os").system("echo hi"))]',
        "[f(a=x)]",
        "[f(**kw)]",
        "[f(a=1e999)]",
        "[f(a={1, 2})]",
        "[f(a=b'x')]",
        "[1, 2, 3]",
        "[]",
        "[f(a=1)",
        "Text with [f(a=1)] inside",
        "<|python_start|>",
    ],
)
def test_what_is_not_a_literal_call_list_comes_back_as_content_exactly(text: str) -> None:
    assert parse_every_way(PythonicToolParser, text) == (text, "", ())


def test_nothing_is_ever_evaluated() -> None:
    assert parse_calls('[f(a=__import__("os").system("exit 1"))]') is None
    assert parse_calls("[f(a=(lambda: 1)())]") is None
    assert parse_calls("[" * 500 + "]" * 500) is None  # too deep for the parser: not calls, not a crash
