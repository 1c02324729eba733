"""Chat templates through the real server: a request template is refused unless the server trusts
them, `chat_template_kwargs` cannot set the render arguments, a tool-call turn with `content: null`
renders, and a looping template is a 4xx within its budget while streams beside it run unchanged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
LOOPING = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
DEFAULT_BUDGET_S = 2.0  # the server's default render budget
PROMPTS = ["List three fruits.", "What is 2 + 2?", "Describe a sunset.", "How do airplanes fly?"] * 2


def _post(base_url: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=60)


def test_request_template_is_400_without_trust(base_url: str) -> None:
    for fields in ({"chat_template": "{{ 'x' }}"}, {"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}):
        resp = _post(base_url, **fields)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "chat_template"
        assert resp.headers["x-request-id"]


def test_kwargs_setting_a_render_argument_are_422(base_url: str) -> None:
    for key in ("messages", "add_generation_prompt", "bos_token"):
        resp = _post(base_url, chat_template_kwargs={key: "x"})
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["param"] == "chat_template_kwargs"
        assert key in resp.json()["error"]["message"]


def test_assistant_tool_call_turn_with_null_content_is_answered(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is 1 + 2?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        ],
        max_tokens=4,
    )
    assert resp.choices[0].finish_reason in {"stop", "length"}


@pytest.fixture(scope="module")
def trusting(start_server: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    with start_server(server_fields={"trust_request_chat_template": True}) as live:
        yield live


@pytest.mark.slow
async def test_looping_template_is_4xx_within_budget_while_streams_run(trusting: Any) -> None:
    async with openai.AsyncOpenAI(base_url=f"{trusting.base_url}/v1", api_key="x", max_retries=0) as ac:

        async def stream_text(prompt: str) -> str:
            chunks = await ac.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, temperature=0, max_tokens=24
            )
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        solo = [await stream_text(p) for p in PROMPTS[:4]] * 2
        streams = [asyncio.ensure_future(stream_text(p)) for p in PROMPTS]
        await asyncio.sleep(0.2)  # the streams are running when the hostile request lands
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=trusting.base_url, timeout=60) as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "chat_template": LOOPING}
            hostile = await http.post("/v1/chat/completions", json=body)
            health = await http.get("/health")
        assert 400 <= hostile.status_code < 500, hostile.text
        assert "time budget" in hostile.json()["error"]["message"]
        assert time.monotonic() - started < DEFAULT_BUDGET_S + 3.0
        assert health.status_code == 200
        assert await asyncio.gather(*streams) == solo
        trusted = await ac.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body={"chat_template": "{{ messages[0].content }}"},
        )
        assert trusted.usage is not None and trusted.usage.prompt_tokens <= 2  # "hi" alone, no role markup
