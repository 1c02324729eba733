"""Loom's tool prompt (loom/serving/tool_prompt.py): each format's markup parses back with its
parser, and a tool conversation becomes plain turns a template without tool support renders."""

from __future__ import annotations

import json

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from parser_cases import parse_every_way

from loom.parsers import get_tool_parser, tool_parser_names
from loom.serving.tool_prompt import (
    messages_with_tool_prompt,
    render_tool_calls,
    render_tool_prompt,
    render_tool_result,
)

TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Time now"}},
]
CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris \\"16e\\""}'},
    },
    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]
# SmolLM2-135M-Instruct's own template: it renders role and content, and nothing about tools.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.mark.parametrize("parser_name", tool_parser_names())
def test_rendered_calls_parse_back_with_the_same_parser(parser_name: str) -> None:
    text = render_tool_calls(CALLS, parser_name)
    expected = (("get_weather", json.dumps({"city": 'Paris "16e"'})), ("get_time", "{}"))
    assert parse_every_way(get_tool_parser(parser_name), text) == ("", "", expected)


@pytest.mark.parametrize("parser_name", tool_parser_names())
def test_the_prompt_names_every_tool_and_the_format(parser_name: str) -> None:
    prompt = render_tool_prompt(TOOLS, parser_name)
    assert "get_weather" in prompt and "Current weather in a city" in prompt and "get_time" in prompt
    marker = {
        "hermes": "<tool_call>",
        "llama3_json": '"parameters"',
        "mistral": "[TOOL_CALLS]",
        "pythonic": "func_name1(",
    }
    assert marker[parser_name] in prompt


def test_hermes_is_the_default_and_unknown_formats_are_refused() -> None:
    assert render_tool_prompt(TOOLS) == render_tool_prompt(TOOLS, "hermes")
    with pytest.raises(ValueError, match="known: hermes"):
        render_tool_prompt(TOOLS, "xml")


def test_a_tool_conversation_becomes_plain_turns() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather and time?"}]},
        {"role": "assistant", "content": None, "tool_calls": CALLS},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
        {"role": "assistant", "content": "Checking again.", "function_call": {"name": "get_time", "arguments": "bad{"}},
        {"role": "function", "name": "get_time", "content": "12:01"},
    ]
    out = messages_with_tool_prompt(messages, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + render_tool_prompt(TOOLS)
    assert out[1]["content"] == "Weather and time?"
    assert out[2] == {"role": "assistant", "content": render_tool_calls(CALLS)}
    assert out[3]["content"] == render_tool_result("18C") + "\n" + render_tool_result("12:00")
    assert out[4]["content"].startswith("Checking again.\n<tool_call>") and '"bad{"' in out[4]["content"]
    assert out[5]["content"] == "<tool_response>\n12:01\n</tool_response>"
    assert messages[2]["content"] is None and "tool_calls" in messages[2]  # the input is left as it was


def test_the_prompt_opens_a_conversation_without_a_system_turn_and_the_template_renders_it() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": CALLS[:1]}]
    out = messages_with_tool_prompt(messages, TOOLS)
    assert out[0] == {"role": "system", "content": render_tool_prompt(TOOLS)}
    template = ImmutableSandboxedEnvironment().from_string(SMOLLM2_TEMPLATE)
    prompt = template.render(messages=out, add_generation_prompt=True)
    assert "<tool_call>" in prompt and '"city": "Paris \\"16e\\""' in prompt and "SmolLM" not in prompt


def test_without_tools_only_the_history_is_rewritten() -> None:
    out = messages_with_tool_prompt([{"role": "tool", "content": "x"}], [], "pythonic")
    assert out == [{"role": "user", "content": "Tool result:\nx"}]
