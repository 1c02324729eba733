"""Tools, reasoning and every message form through the real server on the default model.

SmolLM2's template ignores `tools`, so Loom writes them into the system prompt (Hermes format)
and parses the answer; the suite's server reads `<think>` blocks (`reasoning_parser` qwen3), and
a test makes the model think by prefilling `<think>` with `continue_final_message`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from wire import MODEL, complete, stream, streamed_choices

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
THINKING = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "<think>"}]
PREFILL = {"continue_final_message": True, "add_generation_prompt": False, "max_tokens": 12, "temperature": 0}
HISTORY = [
    {"role": "developer", "content": "Be brief.", "name": "ops"},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}], "name": "ann"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": [{"type": "thinking", "thinking": "it is sunny"}, {"type": "text", "text": "Sunny."}]},
    {"role": "user", "content": "And tomorrow?"},
]


def test_a_prefilled_think_block_is_reasoning(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=THINKING, extra_body=PREFILL)  # type: ignore[arg-type]
    message = resp.choices[0].message.model_dump()
    assert message["reasoning_content"] and message["reasoning_content"] == message["reasoning"]
    assert "<think>" not in (message["content"] or "") and "</think>" not in message["reasoning_content"]


def test_include_reasoning_false_leaves_it_out(base_url: str) -> None:
    message = complete(base_url, THINKING, include_reasoning=False, **PREFILL)["choices"][0]["message"]
    assert message.get("reasoning_content") is None and message.get("reasoning") is None


def test_reasoning_streams_in_deltas(base_url: str) -> None:
    choices = streamed_choices(stream(base_url, THINKING, **PREFILL))
    reasoning = "".join(c["delta"].get("reasoning_content") or "" for c in choices)
    also = "".join(c["delta"].get("reasoning") or "" for c in choices)
    assert reasoning and reasoning == also
    blocking = complete(base_url, THINKING, **PREFILL)["choices"][0]["message"]["reasoning_content"]
    assert reasoning == blocking


@pytest.mark.parametrize("streaming", [False, True])
def test_every_message_form_of_a_tool_round_trip_is_accepted(base_url: str, streaming: bool) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER], "max_tokens": 16, "temperature": 0, "documents": [{"title": "Forecast", "text": "Rain tomorrow."}]}
    if streaming:
        assert stream(base_url, HISTORY, **fields)
    else:
        assert complete(base_url, HISTORY, **fields)["choices"][0]["finish_reason"] in ("stop", "length", "tool_calls")


def test_legacy_function_messages_are_accepted(base_url: str) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    functions = [WEATHER["function"]]
    resp = complete(base_url, messages, functions=functions, max_tokens=8, temperature=0)
    assert resp["choices"][0]["message"].get("tool_calls") in (None, [])


def test_auto_tool_answers_never_leak_markup(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER], max_tokens=40, temperature=0,  # type: ignore[list-item]
    )  # fmt: skip
    choice = resp.choices[0]
    assert "<tool_call>" not in (choice.message.content or "")
    for call in choice.message.tool_calls or []:
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments), dict)
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"


def test_a_thinking_budget_closes_the_block_and_the_answer_follows(base_url: str) -> None:
    fields = {**PREFILL, "max_tokens": 24, "thinking_token_budget": 3, "ignore_eos": True}
    message = complete(base_url, THINKING, **fields)["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"]
    think_ids = post_tokenize(base_url, message["reasoning_content"])
    assert len(think_ids) <= 3


def test_a_constraint_applies_to_the_answer_after_the_thinking(base_url: str) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    fields = {
        **PREFILL, "max_tokens": 64, "thinking_token_budget": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    }  # fmt: skip
    choice = complete(base_url, THINKING, **fields)["choices"][0]
    assert choice["message"]["reasoning_content"]
    assert choice["finish_reason"] == "stop"  # the grammar completed the object
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def post_tokenize(base_url: str, text: str) -> list[int]:
    resp = httpx.post(f"{base_url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
    assert resp.status_code == 200
    return resp.json()["tokens"]  # type: ignore[no-any-return]


TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}}}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_always_validate(base_url: str, parallel: bool) -> None:
    resp = complete(
        base_url, "What time is it in Paris, and what is the weather?", tools=[WEATHER, TIME],
        tool_choice="required", parallel_tool_calls=parallel, max_tokens=96, temperature=0.7, seed=3,
    )  # fmt: skip
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert calls and (parallel or len(calls) == 1)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in calls:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    assert len({c["id"] for c in calls}) == len(calls)


def test_required_calls_stream_their_arguments_as_they_are_written(base_url: str) -> None:
    chunks = stream(
        base_url, "What time is it in Paris, and what is the weather?", tools=[WEATHER, TIME],
        tool_choice="required", max_tokens=96, temperature=0.7, seed=3,
    )  # fmt: skip
    deltas = [d for c in streamed_choices(chunks) for d in c["delta"].get("tool_calls") or []]
    heads = {d["index"]: d for d in deltas if d.get("id")}
    assert heads and all(h["id"].startswith("call_") and h["type"] == "function" for h in heads.values())
    assert len(deltas) > 2 * len(heads)  # arguments arrive in pieces, not whole at the end
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for index, head in heads.items():
        arguments = "".join(d["function"].get("arguments") or "" for d in deltas if d["index"] == index)
        jsonschema.validate(json.loads(arguments), schemas[head["function"]["name"]])
    assert streamed_choices(chunks)[-1]["finish_reason"] == "tool_calls"


def test_a_named_call_streams_openai_shaped_deltas(base_url: str) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}  # its schema is short: an enum
    chunks = stream(base_url, "Time in Rome?", tools=[WEATHER, TIME], tool_choice=named, max_tokens=64, temperature=0)
    deltas = [c["delta"]["tool_calls"][0] for c in streamed_choices(chunks) if c["delta"].get("tool_calls")]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["type"] == "function"
    assert deltas[0]["function"]["name"] == "get_time" and all(d["index"] == 0 for d in deltas)
    assert all(d.get("id") is None for d in deltas[1:])
    arguments = "".join(d["function"]["arguments"] or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), TIME["function"]["parameters"])
    assert streamed_choices(chunks)[-1]["finish_reason"] == "stop"
