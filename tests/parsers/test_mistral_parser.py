"""Mistral `[TOOL_CALLS]`: the JSON-list form and the `name[ARGS]{...}` form, fallbacks."""

from __future__ import annotations

import json

import pytest
from parser_cases import parse_every_way

from loom.parsers.mistral import MistralToolParser


def call(name: str, args: dict) -> tuple[str, str]:
    return name, json.dumps(args)


def test_json_list_of_calls() -> None:
    text = '[TOOL_CALLS] [{"name": "f", "arguments": {"a": "[x]"}}, {"name": "g", "arguments": {}}]'
    assert parse_every_way(MistralToolParser, text, three_way=True) == (
        "",
        "",
        (call("f", {"a": "[x]"}), call("g", {})),
    )


def test_content_then_a_single_object() -> None:
    text = 'Sure.[TOOL_CALLS]{"name": "f", "arguments": {"n": 2}}'
    assert parse_every_way(MistralToolParser, text) == ("Sure.", "", (call("f", {"n": 2}),))


def test_name_args_form_repeated_with_call_ids() -> None:
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS] {}'
    expected = ("", "", (call("get_weather", {"city": "Paris"}), call("get_time", {})))
    assert parse_every_way(MistralToolParser, text) == expected


def test_short_name_args_case_every_three_way_split() -> None:
    assert parse_every_way(MistralToolParser, 'x[TOOL_CALLS]f[ARGS]{"a":1}y', three_way=True) == (
        "xy",
        "",
        (call("f", {"a": 1}),),
    )


@pytest.mark.parametrize(
    "text",
    [
        "[TOOL_CALLS] just words",
        '[TOOL_CALLS][{"name": 1}]',
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, "x"]',
        "[TOOL_CALLS]f[ARGS]not json",
        '[TOOL_CALLS]f[ARGS]{"a": ',
        "[TOOL_CALLS]f[OTHER]{}",
        "[TOOL_CALLS][ARGS]{}",
        "[TOOL_CALLS]",
        "[TOOL_CAL",
        "plain [text] with [brackets]",
    ],
)
def test_what_is_not_a_call_comes_back_as_content_exactly(text: str) -> None:
    assert parse_every_way(MistralToolParser, text) == (text, "", ())


def test_a_bad_call_then_a_good_one() -> None:
    text = '[TOOL_CALLS]oops [TOOL_CALLS]f[ARGS]{"a": 1}'
    assert parse_every_way(MistralToolParser, text) == ("[TOOL_CALLS]oops", "", (call("f", {"a": 1}),))
