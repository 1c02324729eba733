"""One request never harms another, on the real model: a battery of hostile requests sent while a
stream runs leaves that stream's text identical to a solo run, and the server healthy."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest
from wire import MODEL, TIMEOUT_S, stream, streamed_text

PROMPT = "Write a short poem about the sea."
HOSTILE_BODIES: list[bytes] = [
    b'{"model": "%s", "messages": [{"role": "user", "content": "a"}], "frequency_penalty": NaN}' % MODEL.encode(),
    b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % MODEL.encode(),
    b'{"model": "x", "model": "%s", "messages": [{"role": "user", "content": "a"}]}' % MODEL.encode(),
    b"{" * 10_000,
]
HOSTILE_FIELDS: list[dict[str, Any]] = [
    {"stop_token_ids": [49152], "min_tokens": 2},
    {"top_k": 1e20},
    {"top_k": 2**31 - 1, "max_tokens": 2},  # in range: the whole vocabulary, served
    {"stop": ["x" * 1_000_000]},
    {"stop": ["a"] * 10_000},
    {"bad_words": ["w"] * 100_000},
    {"min_tokens": 10**9},
    {"min_tokens": 5, "max_tokens": 2},
    {"chat_template": "{% for i in range(10**9) %}{% for j in range(10**9) %}x{% endfor %}{% endfor %}"},
    {"chat_template_kwargs": {"messages": []}},
    {"chat_template_kwargs": {"add_generation_prompt": False}},
    {"logit_bias": {"49152": 5}},
    {"request_id": "a\r\nb"},
    {"messages": [{"role": "assistant", "content": None}], "max_tokens": 2},
    {"n": 10_000},
]


def _fire(base_url: str, outcomes: list[int]) -> None:
    with httpx.Client(base_url=base_url, timeout=TIMEOUT_S) as client:
        for raw in HOSTILE_BODIES:
            resp = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
            outcomes.append(resp.status_code)
        for fields in HOSTILE_FIELDS:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}
            resp = client.post("/v1/chat/completions", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            outcomes.append(resp.status_code)


def test_hostile_requests_beside_a_stream_leave_its_text_unchanged(base_url: str) -> None:
    fields = {"temperature": 0, "max_tokens": 48, "ignore_eos": True}
    solo = streamed_text(stream(base_url, PROMPT, **fields))
    outcomes: list[int] = []
    attacker = threading.Thread(target=_fire, args=(base_url, outcomes))
    attacker.start()
    beside = streamed_text(stream(base_url, PROMPT, **fields))
    attacker.join(timeout=TIMEOUT_S)
    assert beside == solo
    assert len(outcomes) == len(HOSTILE_BODIES) + len(HOSTILE_FIELDS)
    assert all(status < 500 for status in outcomes), outcomes
    assert httpx.get(f"{base_url}/health", timeout=30).status_code == 200


@pytest.mark.parametrize("content", [None, ""])
def test_an_assistant_turn_with_null_content_renders(base_url: str, content: str | None) -> None:
    messages = [
        {"role": "user", "content": "What is the weather?"},
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0}
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    assert resp.status_code == 200, resp.text
