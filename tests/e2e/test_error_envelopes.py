"""Bad requests against the live server: each answers with the OpenAI error envelope and its status,
and the server goes on answering normal requests afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c


def post(http: httpx.Client, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    return http.post(path, json=body)


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"
    return dict(body["error"])


def assert_still_serving(http: httpx.Client) -> None:
    resp = post(http, {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 2


def test_body_that_is_not_json_is_400(http: httpx.Client) -> None:
    resp = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    error_of(resp)
    assert_still_serving(http)


def test_body_that_is_not_an_object_is_400(http: httpx.Client) -> None:
    resp = post(http, ["not", "an", "object"])  # type: ignore[arg-type]
    assert resp.status_code == 400
    error_of(resp)
    assert_still_serving(http)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
    ],
    ids=["temperature", "n", "max_tokens", "top_p", "empty-messages", "unknown-role", "missing-role"],
)
def test_invalid_field_is_422_naming_it(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    resp = post(http, {"model": MODEL, "messages": USER, "max_tokens": 4, **fields})
    assert resp.status_code == 422, resp.text
    error = error_of(resp)
    assert error["param"] == param
    detail = resp.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all({"loc", "msg", "type"} <= set(item) for item in detail)
    assert detail[0]["loc"][:2] == ["body", param]
    assert_still_serving(http)


def test_unknown_model_is_404(http: httpx.Client) -> None:
    resp = post(http, {"model": "gpt-nope", "messages": USER, "max_tokens": 4})
    assert resp.status_code == 404
    error = error_of(resp)
    assert error["param"] == "model"
    assert error["code"] == "model_not_found"
    assert "gpt-nope" in error["message"]
    assert_still_serving(http)


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "streaming"])
def test_prompt_plus_max_tokens_beyond_the_context_is_400_with_both_numbers(http: httpx.Client, stream: bool) -> None:
    probe = post(http, {"model": MODEL, "messages": USER, "max_tokens": 1})
    num_prompt = probe.json()["usage"]["prompt_tokens"]
    max_tokens = MAX_MODEL_LEN - num_prompt + 5
    resp = post(http, {"model": MODEL, "messages": USER, "max_tokens": max_tokens, "stream": stream})
    assert resp.status_code == 400, resp.text
    error = error_of(resp)
    assert str(MAX_MODEL_LEN) in error["message"]
    assert str(num_prompt + max_tokens) in error["message"]
    assert_still_serving(http)


def test_prompt_alone_beyond_the_context_is_400(http: httpx.Client) -> None:
    long_text = "word " * (MAX_MODEL_LEN + 100)
    resp = post(http, {"model": MODEL, "messages": [{"role": "user", "content": long_text}]})
    assert resp.status_code == 400, resp.text
    assert str(MAX_MODEL_LEN) in error_of(resp)["message"]
    assert_still_serving(http)


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"service_tier": "flex"}, "service_tier"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"tool_choice": "required"}, "tool_choice"),  # required without tools: a 422 naming it
    ],
    ids=["service_tier", "modalities", "tool_choice"],
)
def test_unsupported_field_with_a_value_is_422_naming_it(http: httpx.Client, fields: dict[str, Any], name: str) -> None:
    resp = post(http, {"model": MODEL, "messages": USER, "max_tokens": 4, **fields})
    assert resp.status_code == 422, resp.text
    error = error_of(resp)
    assert error["param"] == name
    assert name in error["message"]
    assert_still_serving(http)


def test_unsupported_field_at_its_default_is_accepted(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": USER, "max_tokens": 2, "response_format": {"type": "text"}, "tools": []}
    resp = post(http, body)
    assert resp.status_code == 200, resp.text


def test_image_content_part_is_rejected(http: httpx.Client) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, image]}]
    resp = post(http, {"model": MODEL, "messages": messages, "max_tokens": 4})
    assert 400 <= resp.status_code < 500, resp.text
    assert error_of(resp)["param"] == "messages"
    assert_still_serving(http)


def test_text_content_parts_are_accepted(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    resp = post(http, {"model": MODEL, "messages": messages, "max_tokens": 2})
    assert resp.status_code == 200, resp.text


def test_unknown_route_is_404_envelope(http: httpx.Client) -> None:
    resp = http.get("/v1/nowhere")
    assert resp.status_code == 404
    error_of(resp)


def test_reused_request_id_in_flight_is_served_independently(http: httpx.Client, base_url: str) -> None:
    """As in vLLM, a client may reuse a running request's id: both are served, neither is harmed."""
    body = {
        "model": MODEL,
        "messages": USER,
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": True,
        "request_id": "e2e-dup",
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as first:
        lines = (line for line in first.iter_lines() if line)
        head = [next(lines) for _ in range(3)]  # role, then two tokens: the first is running now
        assert all(line.startswith("data: ") for line in head)
        second = post(http, {**body, "stream": False})
        assert second.status_code == 200, second.text
        assert second.json()["id"] == "e2e-dup"
        assert second.json()["usage"]["completion_tokens"] == 24
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert_still_serving(http)
