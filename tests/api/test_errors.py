"""Every failure of an app with `install_error_handlers` answers with the OpenAI error envelope."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from loom.api.errors import (
    APIError,
    RateLimitError,
    ServiceUnavailableError,
    install_error_handlers,
    model_not_found,
    unsupported_parameters,
)
from loom.api.protocol import ChatCompletionRequest, unsupported_fields

USER = [{"role": "user", "content": "hi"}]


def build_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> dict[str, Any]:
        if req.model == "missing":
            raise model_not_found(req.model)
        if names := unsupported_fields(req):
            raise unsupported_parameters(names)
        return {"ok": True, "extra": sorted(req.model_extra or {})}

    @app.get("/busy")
    async def busy() -> None:
        raise ServiceUnavailableError("Server overloaded, retry later.")

    @app.get("/limited")
    async def limited() -> None:
        raise RateLimitError("Too many requests.", headers={"retry-after": "2"})

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(status_code=418, detail="short and stout")

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    return app


@pytest.fixture
def client() -> TestClient:
    # the 500 handler answers, then Starlette re-raises for the server log; do not re-raise here
    return TestClient(build_app(), raise_server_exceptions=False)


def post(client: TestClient, **fields: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": "m", "messages": USER, **fields})


def assert_envelope(body: dict[str, Any], error_type: str) -> dict[str, Any]:
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == error_type
    return error


def test_valid_request_passes_and_keeps_unknown_fields(client: TestClient) -> None:
    resp = post(client, my_vendor_flag=True)
    assert resp.status_code == 200
    assert resp.json() == {"ok": True, "extra": ["my_vendor_flag"]}


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"a string"', "application/json"),
        (b"", "application/json"),
        (b"model=m", "text/plain"),
    ],
)
def test_body_that_is_not_a_json_object_is_400(
    client: TestClient, body: bytes, content_type: str
) -> None:
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert resp.status_code == 400
    assert_envelope(resp.json(), "invalid_request_error")
    assert "detail" not in resp.json()


def test_invalid_temperature_is_422_with_envelope_and_detail(client: TestClient) -> None:
    resp = post(client, temperature=-1)
    assert resp.status_code == 422
    body = resp.json()
    error = assert_envelope(body, "invalid_request_error")
    assert error["param"] == "temperature"
    assert "temperature" in error["message"]
    assert body["detail"][0]["loc"] == ["body", "temperature"]
    assert set(body["detail"][0]) == {"loc", "msg", "type"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"top_p": 2}, "top_p"),
        ({"messages": None}, "messages"),
    ],
)
def test_invalid_field_is_422_naming_it(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    resp = post(client, **fields)
    assert resp.status_code == 422
    assert assert_envelope(resp.json(), "invalid_request_error")["param"] == param
    assert resp.json()["detail"]


def test_missing_required_field_is_422(client: TestClient) -> None:
    resp = client.post("/v1/chat/completions", json={"model": "m"})
    assert resp.status_code == 422
    error = assert_envelope(resp.json(), "invalid_request_error")
    assert error["param"] == "messages" and "Missing required parameter" in error["message"]


def test_nested_error_message_names_the_path(client: TestClient) -> None:
    resp = post(
        client, messages=[{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}]
    )
    assert resp.status_code == 422
    assert "messages[1]" in resp.json()["error"]["message"]


def test_unsupported_field_is_422_naming_it(client: TestClient) -> None:
    resp = post(client, service_tier="flex", modalities=["text", "audio"])
    assert resp.status_code == 422
    error = assert_envelope(resp.json(), "invalid_request_error")
    assert error["param"] == "service_tier" and error["code"] == "unsupported_parameter"  # field order
    assert "'service_tier'" in error["message"] and "'modalities'" in error["message"]


def test_unknown_model_is_404_model_not_found(client: TestClient) -> None:
    resp = post(client, model="missing")
    assert resp.status_code == 404
    error = assert_envelope(resp.json(), "invalid_request_error")
    assert (error["code"], error["param"]) == ("model_not_found", "model")


def test_unknown_route_is_404_envelope(client: TestClient) -> None:
    resp = client.post("/v1/nothing-here", json={})
    assert resp.status_code == 404
    assert "/v1/nothing-here" in assert_envelope(resp.json(), "invalid_request_error")["message"]


def test_wrong_method_is_405_envelope(client: TestClient) -> None:
    resp = client.get("/v1/chat/completions")
    assert resp.status_code == 405
    assert_envelope(resp.json(), "invalid_request_error")


def test_http_exception_keeps_status_and_detail(client: TestClient) -> None:
    resp = client.get("/teapot")
    assert resp.status_code == 418
    assert assert_envelope(resp.json(), "invalid_request_error")["message"] == "short and stout"


def test_api_errors_keep_status_code_and_headers(client: TestClient) -> None:
    busy = client.get("/busy")
    assert busy.status_code == 503
    assert_envelope(busy.json(), "server_error")
    limited = client.get("/limited")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert assert_envelope(limited.json(), "rate_limit_error")["code"] == "rate_limit_exceeded"


def test_unhandled_exception_is_500_without_internals(client: TestClient) -> None:
    resp = client.get("/boom")
    assert resp.status_code == 500
    assert_envelope(resp.json(), "server_error")
    assert "secret" not in resp.text and "Traceback" not in resp.text


def test_api_error_defaults_to_500_server_error() -> None:
    err = APIError("x")
    assert err.status_code == 500
    assert err.envelope() == {
        "error": {"message": "x", "type": "server_error", "param": None, "code": None}
    }
