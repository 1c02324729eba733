"""The tool fields at the edge: inconsistent or malformed tool requests are a 422 naming the field,
before anything runs; consistent ones are served."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import chat_body
from fastapi.testclient import TestClient

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": NAMED}, "tool_choice"),
        ({"tools": [], "tool_choice": "required"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "functions": [{"name": "f"}]}, "functions"),
        ({"functions": [{"description": "no name"}]}, "functions"),
        ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "tool_choice"),
    ],
)
def test_inconsistent_tool_requests_are_422(api: TestClient, fields: dict[str, Any], param: str) -> None:
    resp = api.post("/v1/chat/completions", json=chat_body(**fields))
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == param
    assert api.app.state.engine.requests == []


def test_a_malformed_schema_names_the_tool(api: TestClient) -> None:
    bad = {"type": "function", "function": {"name": "broken_tool", "parameters": {"type": "nonsense"}}}
    resp = api.post("/v1/chat/completions", json=chat_body(tools=[WEATHER, bad]))
    assert resp.status_code == 422
    assert "tools[1]" in resp.json()["error"]["message"] and "broken_tool" in resp.json()["error"]["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [WEATHER]},
        {"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False},
        {"tools": [WEATHER], "tool_choice": "none"},
        {"tools": [], "tool_choice": "none"},
        {"functions": [{"name": "f", "parameters": {"type": "object"}}], "function_call": "auto"},
        {"reasoning_effort": "low", "include_reasoning": False},
        {"reasoning_content": True},
        {"documents": [{"title": "t", "text": "abc"}]},
        {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "a"}]},
    ],
)
def test_consistent_tool_and_reasoning_requests_are_served(api: TestClient, fields: dict[str, Any]) -> None:
    resp = api.post("/v1/chat/completions", json=chat_body(max_tokens=1, **fields))
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("part", ["image_url", "input_audio", "video_url", "file", "audio_url"])
def test_media_parts_for_a_text_model_are_422_naming_the_part(api: TestClient, part: str) -> None:
    payloads = {
        "image_url": {"url": "http://127.0.0.1:9/never-fetched.png"},
        "input_audio": {"data": "AAAA", "format": "wav"},
        "video_url": {"url": "http://127.0.0.1:9/v.mp4"},
        "file": {"file_id": "f"},
        "audio_url": {"url": "http://127.0.0.1:9/a.wav"},
    }
    content = [{"type": "text", "text": "look"}, {"type": part, part: payloads[part]}]
    resp = api.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": content}]))
    assert resp.status_code == 422
    assert part in resp.json()["error"]["message"]


def test_a_forced_call_does_not_combine_with_beam_search(api: TestClient) -> None:
    resp = api.post("/v1/chat/completions", json=chat_body(tools=[WEATHER], tool_choice="required", use_beam_search=True))
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "tool_choice"
