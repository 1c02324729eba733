"""What a hostile or careless body gets at the edge: a plain 4xx in the error envelope, with
`x-request-id`, before anything runs. The toy engine records every request that reached it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import MODEL, chat_body
from fastapi.testclient import TestClient


def post_raw(api: TestClient, raw: bytes | str) -> Any:
    return api.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})


def assert_refused(resp: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers.get("x-request-id")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": "2"}, "n"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": 10.0}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream": 1}, "stream"),
        ({"min_tokens": 1e9}, "min_tokens"),
        ({"top_k": 1e20}, "top_k"),
        ({"top_k": 10**20}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"request_id": "a\r\nb"}, "request_id"),
        ({"request_id": "x" * 300}, "request_id"),
        ({"cache_salt": "salt\x00"}, "cache_salt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"guided_choice": []}, "guided_choice"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"logit_bias": {"1e3": 1}}, "logit_bias"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"min_tokens": 5, "max_completion_tokens": 4}, "min_tokens"),
    ],
)
def test_a_wrong_value_is_a_422_naming_its_field(api: TestClient, fields: dict[str, Any], param: str) -> None:
    assert_refused(api.post("/v1/chat/completions", json=chat_body(**fields)), 422, param)


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "toy", "messages": [{"role": "user", "content": "a"}], "frequency_penalty": NaN}',
        '{"model": "toy", "messages": [{"role": "user", "content": "a"}], "presence_penalty": Infinity}',
        '{"model": "toy", "messages": [{"role": "user", "content": "a"}], "temperature": 1e999}',
        '{"model": "toy", "messages": [{"role": "user", "content": "\\ud800"}]}',
        '{"model": "toy", "model": "other", "messages": [{"role": "user", "content": "a"}]}',
        '{"model": "toy", "messages": [{"role": "user", "content": "a", "content": "b"}]}',
        '{"model": "toy", "messages": [{"role": "user", "content": "a"}], "n": ' + "9" * 100 + "}",
        '{"model": "toy", "messages": [{"role": "user", "content": "a"}], "x": ' + "[" * 5000 + "]" * 5000 + "}",
    ],
    ids=["nan", "infinity", "overflow", "lone-surrogate", "duplicate-key", "nested-duplicate-key", "huge-int", "deep"],
)
def test_json_that_python_would_accept_is_refused(api: TestClient, raw: str) -> None:
    error = assert_refused(post_raw(api, raw), 400)
    assert error["code"] == "invalid_json"


def test_a_body_that_is_not_utf8_is_400(api: TestClient) -> None:
    assert_refused(post_raw(api, b'{"model": "\xff"}'), 400)


def test_refused_requests_never_reach_the_engine(api: TestClient) -> None:
    engine = api.app.state.engine
    for fields in ({"n": "2"}, {"stop": ""}, {"stop_token_ids": [5]}, {"logit_bias": {"99": 1}}):
        assert api.post("/v1/chat/completions", json=chat_body(**fields)).status_code in (400, 422)
    assert engine.requests == []
    assert api.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200
    assert len(engine.requests) == 1


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop_token_ids": [5]}, "stop_token_ids"),
        ({"allowed_token_ids": [0, 7]}, "allowed_token_ids"),
        ({"logit_bias": {"99": 1}}, "logit_bias"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_422(api: TestClient, fields: dict[str, Any], param: str) -> None:
    assert_refused(api.post("/v1/chat/completions", json=chat_body(**fields)), 422, param)


def test_min_tokens_past_the_context_window_is_400(api: TestClient) -> None:
    assert_refused(api.post("/v1/chat/completions", json=chat_body(min_tokens=10**9)), 400, "min_tokens")


def test_an_unhandled_error_is_a_plain_500_with_the_request_id(api: TestClient) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("/secret/path exploded")
        yield

    api.app.state.engine.generate = broken
    resp = api.post("/v1/chat/completions", json=chat_body(max_tokens=1), headers={"x-request-id": "trace-9"})
    assert resp.status_code == 500
    assert resp.headers["x-request-id"]
    assert "secret" not in resp.text and "exploded" not in resp.text
    assert resp.json()["error"]["type"] == "server_error"


def test_an_oversized_body_is_413_before_it_is_read(make_api: Any) -> None:
    from loom.api.limits import RequestLimits

    with make_api(limits=RequestLimits(max_body_bytes=1000)) as api:
        body = json.dumps(chat_body(user="x" * 2000))
        error = assert_refused(post_raw(api, body), 413)
        assert error["code"] == "request_too_large"

        def chunks() -> Any:  # no content-length: counted while read
            yield body[:500].encode()
            yield body[500:].encode()

        resp = api.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert_refused(resp, 413)
        assert api.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code == 200


def test_model_must_be_one_of_the_served_names(api: TestClient) -> None:
    assert api.post("/v1/chat/completions", json=chat_body(model="org/toy", max_tokens=1)).status_code == 200
    error = assert_refused(api.post("/v1/chat/completions", json=chat_body(model="gpt-4")), 404, "model")
    assert error["code"] == "model_not_found"
    assert MODEL not in error["message"]  # the answer does not list what else is served


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize", "/v1/completions"])
def test_every_json_route_parses_strictly(api: TestClient, path: str) -> None:
    raw = '{"model": "toy", "model": "toy", "prompt": "a", "tokens": [1]}'
    resp = api.post(path, content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
