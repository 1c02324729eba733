"""How one choice's text is read back: tool calls parsed (auto), constrained text read as calls
(named, required), reasoning split, and the finish_reason that follows; streamed piece by piece
or whole, with the same result."""

from __future__ import annotations

import json

import pytest

from loom.serving.choice_output import ChoiceOutput, OutputPlan, collect
from loom.serving.tools import ToolOptions, tool_options, tool_spec

WEATHER = tool_spec(0, "get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})
TIME = tool_spec(1, "get_time", None, {"type": "object"})
TOOLS = (WEATHER, TIME)


def plan(choice: str | None = None, named: str | None = None, parallel: bool = True, **fields: object) -> OutputPlan:
    tools = tool_options(TOOLS, choice, named, parallel)
    return OutputPlan(tools=tools, tool_parser="hermes" if tools is not None else None, **fields)  # type: ignore[arg-type]


def streamed(output: ChoiceOutput, text: str, step: int) -> tuple[str, str, dict[int, list[str]], dict[int, str]]:
    pieces = [output.feed(text[i : i + step]) for i in range(0, len(text), step)] + [output.finish()]
    args: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for call in (c for p in pieces for c in p.tool_calls):
        if call.name is not None:
            names[call.index] = call.name
        args.setdefault(call.index, []).append(call.arguments)
    return "".join(p.content for p in pieces), "".join(p.reasoning for p in pieces), args, names


AUTO_TEXT = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_auto_calls_are_parsed_the_same_in_any_chunking(step: int) -> None:
    out = ChoiceOutput(plan("auto"))
    content, _, args, names = streamed(out, AUTO_TEXT, step)
    assert content.strip() == "Let me check."
    assert names == {0: "get_weather"}
    assert json.loads("".join(args[0])) == {"city": "Paris"}
    assert out.finish_reason("stop") == "tool_calls"
    assert out.finish_reason("length") == "length"


def test_whole_text_collects_into_finished_calls() -> None:
    content, reasoning, calls = collect(ChoiceOutput(plan("auto")), AUTO_TEXT + AUTO_TEXT)
    assert reasoning is None
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_parallel_false_keeps_only_the_first_call() -> None:
    _, _, calls = collect(ChoiceOutput(plan("auto", parallel=False)), AUTO_TEXT + AUTO_TEXT)
    assert len(calls) == 1


def test_a_named_call_streams_its_arguments_and_keeps_stop() -> None:
    out = ChoiceOutput(plan(named="get_weather"))
    content, _, args, names = streamed(out, '{"city": "Rome"}', 4)
    assert content == "" and names == {0: "get_weather"}
    assert json.loads("".join(args[0])) == {"city": "Rome"}
    assert out.finish_reason("stop") == "stop"


def test_required_streams_each_call_as_it_is_written() -> None:
    text = '[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Os\\"lo}"}}]'
    out = ChoiceOutput(plan("required"))
    first = out.feed(text[: text.index("city")])  # the first call is whole, the second named
    assert [(c.index, c.name, c.arguments) for c in first.tool_calls] == [
        (0, "get_time", ""),
        (0, None, "{}"),
        (1, "get_weather", ""),
        (1, None, '{"'),
    ]
    assert first.tool_calls[0].id != first.tool_calls[2].id and first.tool_calls[2].id.startswith("call_")
    for size in (1, 3, 5, len(text)):
        out = ChoiceOutput(plan("required"))
        content, _, args, names = streamed(out, text, size)
        assert content == "" and names == {0: "get_time", 1: "get_weather"}
        assert json.loads("".join(args[0])) == {} and json.loads("".join(args[1])) == {"city": 'Os"lo}'}
        assert out.finish_reason("stop") == "tool_calls"


def test_required_cut_short_inside_the_arguments_keeps_the_calls_so_far() -> None:
    out = ChoiceOutput(plan("required"))
    content, _, args, names = streamed(out, '[{"name": "get_weather", "parameters": {"city": "Ro', 4)
    assert content == "" and names == {0: "get_weather"} and "".join(args[0]) == '{"city": "Ro'
    assert out.finish_reason("length") == "length"


def test_required_cut_short_gives_the_text_back_as_content() -> None:
    out = ChoiceOutput(plan("required"))
    content, _, args, _ = streamed(out, '[{"name": "get_ti', 4)
    assert content == '[{"name": "get_ti' and args == {}
    assert out.finish_reason("length") == "length"


def test_the_required_constraint_allows_only_declared_calls() -> None:
    from jsonschema import Draft202012Validator

    tools = tool_options(TOOLS, "required", None, parallel=False)
    assert isinstance(tools, ToolOptions)
    spec = tools.constraint()
    assert spec is not None
    validator = Draft202012Validator(json.loads(spec.text))
    assert validator.is_valid([{"name": "get_time", "parameters": {}}])
    assert not validator.is_valid([{"name": "other", "parameters": {}}])
    assert not validator.is_valid([])
    assert not validator.is_valid([{"name": "get_time", "parameters": {}}] * 2)  # parallel false


@pytest.mark.parametrize("include", [True, False])
def test_reasoning_is_split_and_may_be_left_out(include: bool) -> None:
    out = ChoiceOutput(OutputPlan(reasoning_parser="qwen3", include_reasoning=include))
    content, reasoning, calls = collect(out, "<think>Two and two.</think>It is 4.")
    assert content == "It is 4." and calls == ()
    assert reasoning == ("Two and two." if include else None)


def test_a_block_the_prompt_opened_is_reasoning_from_the_start() -> None:
    out = ChoiceOutput(OutputPlan(reasoning_parser="qwen3"), prompt_text="<|im_start|>assistant\n<think>\n")
    content, reasoning, _ = collect(out, "hmm, four.</think>4")
    assert (reasoning, content) == ("hmm, four.", "4")
