"""Hermes / Qwen `<tool_call>` parsing: whole and chunk by chunk, calls, fallbacks, held text."""

from __future__ import annotations

import json

import pytest
from parser_cases import parse_every_way, run_chunks

from loom.parsers.hermes import HermesToolParser

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'


def calls(*pairs: tuple[str, dict]) -> tuple[tuple[str, str], ...]:
    return tuple((name, json.dumps(args, ensure_ascii=False)) for name, args in pairs)


def test_plain_answer_is_content_unchanged_whatever_the_chunking() -> None:
    text = "Use a < b, then <b>bold</b> and <tool ok.\n"
    assert parse_every_way(HermesToolParser, text, three_way=True) == (text, "", ())


def test_one_call_after_content() -> None:
    text = f"Let me check.\n\n<tool_call>\n{WEATHER}\n</tool_call>"
    expected = ("Let me check.", "", calls(("get_weather", {"city": "Paris", "unit": "celsius"})))
    assert parse_every_way(HermesToolParser, text) == expected


def test_two_calls_and_whitespace_between_them_is_dropped() -> None:
    text = f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n"
    weather = ("get_weather", {"city": "Paris", "unit": "celsius"})
    assert parse_every_way(HermesToolParser, text) == ("", "", calls(weather, ("get_time", {"tz": "Europe/Paris"})))


def test_short_case_every_three_way_split() -> None:
    text = 'a<tool_call>{"name":"f","arguments":{"x":"}"}}</tool_call>b'
    assert parse_every_way(HermesToolParser, text, three_way=True) == ("ab", "", calls(("f", {"x": "}"})))


def test_a_list_body_is_several_calls_and_missing_arguments_are_empty() -> None:
    text = '<tool_call>[{"name": "a", "arguments": {"k": 1}}, {"name": "b"}]</tool_call>'
    assert parse_every_way(HermesToolParser, text) == ("", "", calls(("a", {"k": 1}), ("b", {})))


def test_unclosed_call_at_the_end_still_parses() -> None:
    text = f"<tool_call>\n{WEATHER}\n"
    assert parse_every_way(HermesToolParser, text)[2] == calls(("get_weather", {"city": "Paris", "unit": "celsius"}))


def test_a_call_missing_its_closing_tag_ends_at_the_next_call() -> None:
    text = f"<tool_call>{TIME}\n<tool_call>{TIME}</tool_call>"
    assert parse_every_way(HermesToolParser, text)[2] == calls(*[("get_time", {"tz": "Europe/Paris"})] * 2)


def test_arguments_sent_as_a_json_string_are_read_through() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2], \\"é\\": \\"ü\\"}"}</tool_call>'
    assert parse_every_way(HermesToolParser, text)[2] == calls(("f", {"a": [1, 2], "é": "ü"}))


@pytest.mark.parametrize(
    "text",
    [
        'Sure.<tool_call>{"name": "f", "arguments": {</tool_call> and more',
        "<tool_call>not json at all</tool_call>",
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',
        '<tool_call>{"name": "two words", "arguments": {}}</tool_call>',
        "<tool_call></tool_call>",
        '<tool_call>{"name": "f", "arguments": {"a": 1',
        "text then <tool_call>",
        "ends with a partial marker <tool_ca",
    ],
)
def test_malformed_markup_comes_back_as_content_exactly(text: str) -> None:
    assert parse_every_way(HermesToolParser, text) == (text, "", ())


def test_malformed_call_then_a_valid_one() -> None:
    text = f"<tool_call>oops</tool_call><tool_call>{TIME}</tool_call>"
    assert parse_every_way(HermesToolParser, text) == (
        "<tool_call>oops</tool_call>",
        "",
        calls(("get_time", {"tz": "Europe/Paris"})),
    )


def test_a_marker_split_across_chunks_is_held_then_read() -> None:
    parser = HermesToolParser()
    assert parser.feed("Checking <tool_").content == "Checking"  # the space too may end up dropped
    assert not parser.feed("ca")
    delta = parser.feed(f"ll>{TIME}</tool_call>")
    assert [c.name for c in delta.tool_calls] == ["get_time"]
    assert not parser.finish()


def test_finish_flushes_the_held_back_text() -> None:
    parser = HermesToolParser()
    assert parser.feed("a <tool_c").content == "a"
    assert parser.finish().content == " <tool_c"


def test_the_call_comes_whole_in_one_openai_shaped_delta() -> None:
    output, deltas = run_chunks(HermesToolParser(), [f"<tool_call>{TIME}", "</tool_call>"])
    (call,) = [c for d in deltas for c in d.tool_calls]
    assert (call.index, call.name, json.loads(call.arguments_delta)) == (0, "get_time", {"tz": "Europe/Paris"})
    assert call.id == output.tool_calls[0].id


def test_call_ids_are_unique() -> None:
    text = "".join(f"<tool_call>{TIME}</tool_call>" for _ in range(50))
    ids = [c.id for p in (HermesToolParser(), HermesToolParser()) for c in run_chunks(p, [text])[0].tool_calls]
    assert len(ids) == 100 and len(set(ids)) == 100
