"""Llama 3 JSON tool calls: bare or after `<|python_tag|>`, `;`-separated; JSON answers stay content."""

from __future__ import annotations

import json

import pytest
from parser_cases import parse_every_way

from loom.parsers.llama3_json import Llama3JsonToolParser

WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
SEARCH = '{"name": "search", "arguments": {"q": "a; b {c}"}}'


def call(name: str, args: dict) -> tuple[str, str]:
    return name, json.dumps(args)


def test_a_bare_call_with_parameters() -> None:
    assert parse_every_way(Llama3JsonToolParser, f"  {WEATHER}", three_way=True) == (
        "",
        "",
        (call("get_weather", {"city": "Paris"}),),
    )


def test_python_tag_then_calls_separated_by_semicolons() -> None:
    text = f"<|python_tag|>{WEATHER}; {SEARCH};"
    expected = ("", "", (call("get_weather", {"city": "Paris"}), call("search", {"q": "a; b {c}"})))
    assert parse_every_way(Llama3JsonToolParser, text) == expected


def test_calls_on_separate_lines() -> None:
    assert (
        parse_every_way(Llama3JsonToolParser, f"{WEATHER}\n{WEATHER}\n")[2]
        == (call("get_weather", {"city": "Paris"}),) * 2
    )


def test_content_before_the_python_tag() -> None:
    text = f"I will look it up.\n<|python_tag|>{SEARCH}"
    assert parse_every_way(Llama3JsonToolParser, text) == (
        "I will look it up.",
        "",
        (call("search", {"q": "a; b {c}"}),),
    )


def test_text_after_the_calls_is_content() -> None:
    assert parse_every_way(Llama3JsonToolParser, f"{WEATHER} Done.") == (
        "Done.",
        "",
        (call("get_weather", {"city": "Paris"}),),
    )


@pytest.mark.parametrize(
    "text",
    [
        "The answer is {not json}.",
        '{"answer": 42, "name": "x"}',  # a JSON answer: no parameters, not a call
        '{"name": "Bob", "age": 3}',
        '<|python_tag|>brave_search.call(query="weather")',
        '{"name": "f", "parameters": {"a": 1',
        "<|python_tag|>",
        "ends with <|python_t",
        "[1, 2, 3]",
    ],
)
def test_what_is_not_a_call_comes_back_as_content_exactly(text: str) -> None:
    assert parse_every_way(Llama3JsonToolParser, text) == (text, "", ())


def test_a_second_value_that_is_not_a_call_is_content_with_its_separator() -> None:
    text = f'{WEATHER}; {{"x": 1}} tail'
    assert parse_every_way(Llama3JsonToolParser, text) == (
        '; {"x": 1} tail',
        "",
        (call("get_weather", {"city": "Paris"}),),
    )
