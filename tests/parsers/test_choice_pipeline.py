"""The per-choice pipeline: reasoning first, then tool calls in the answer only."""

from __future__ import annotations

import json

from parser_cases import parse_every_way, run_chunks

from loom.parsers import ChoiceParser, make_choice_parser, merge
from loom.parsers.types import ParsedDelta, ToolCallDelta


def test_reasoning_then_tool_calls_every_split() -> None:
    text = '<think>maybe <tool_call>{"name": "no"}</tool_call></think>\nOK.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    expected = ("OK.", 'maybe <tool_call>{"name": "no"}</tool_call>', (("f", json.dumps({"a": 1})),))
    assert parse_every_way(lambda: make_choice_parser("hermes", "qwen3"), text) == expected


def test_template_opened_thinking_with_pythonic_calls() -> None:
    factory = lambda: make_choice_parser("pythonic", "deepseek_r1", prompt_text="<｜Assistant｜><think>\n")  # noqa: E731
    assert parse_every_way(factory, "plan</think>\n\n[f(x=1)]") == ("", "plan", (("f", '{"x": 1}'),))


def test_unfinished_thinking_reaches_finish_as_reasoning_and_tools_flush() -> None:
    parser = make_choice_parser("hermes", "deepseek_r1")
    assert parser.in_reasoning
    output, _ = run_chunks(parser, ["a</think>b <tool_", "c"])
    assert (output.reasoning, output.content, parser.in_reasoning) == ("a", "b <tool_c", False)


def test_without_parsers_text_passes_through() -> None:
    assert parse_every_way(ChoiceParser, " <think>x</think> <tool_call>{}</tool_call>")[0] == (
        " <think>x</think> <tool_call>{}</tool_call>"
    )


def test_merge_keeps_order() -> None:
    call = ToolCallDelta(0, "call_x", "f", "{}")
    merged = merge(ParsedDelta("a", "r"), ParsedDelta("b", "", (call,)))
    assert merged == ParsedDelta("ab", "r", (call,))


def test_markers_name_the_markup_serving_must_keep_in_the_text() -> None:
    assert make_choice_parser("hermes", "qwen3").markers == ("<think>", "</think>", "<tool_call>", "</tool_call>")
    assert make_choice_parser("llama3_json").markers == ("<|python_tag|>",)
    assert make_choice_parser("pythonic").markers == ("<|python_start|>", "<|python_end|>")
    assert make_choice_parser("mistral", "mistral").markers == (
        "[THINK]",
        "[/THINK]",
        "[TOOL_CALLS]",
        "[ARGS]",
        "[CALL_ID]",
    )
    assert ChoiceParser().markers == ()
