"""The routes besides generation: models and their aliases, health, ping, version, CORS,
tokenize and detokenize, on the real `create_app` over the toy engine."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from toy_engine import EOS


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/", "/api/v1/models", "/api/v1/models/"])
def test_model_list_answers_on_every_alias_without_redirect(api: TestClient, path: str) -> None:
    resp = api.get(path, follow_redirects=False)
    assert resp.status_code == 200
    cards = resp.json()["data"]
    assert [c["id"] for c in cards] == ["toy", "org/toy"]
    assert {c["root"] for c in cards} == {"toy"}  # a name, never a path
    assert all("/" not in c["root"] for c in cards)


@pytest.mark.parametrize("path", ["/v1/models/org/toy", "/api/v1/models/org/toy", "/v1/models/toy"])
def test_one_model_by_id_even_with_a_slash(api: TestClient, path: str) -> None:
    resp = api.get(path)
    assert resp.status_code == 200
    assert resp.json()["id"] == path.split("/models/")[1]


def test_an_unknown_model_id_is_404_in_the_envelope(api: TestClient) -> None:
    resp = api.get("/v1/models/nope")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "model_not_found"


def test_health_ping_and_version(api: TestClient) -> None:
    assert api.get("/health").json() == {"status": "ok"}
    assert api.get("/ping").status_code == 200
    assert api.post("/ping").status_code == 200
    assert api.get("/version").json()["version"]


def test_a_browser_preflight_succeeds(api: TestClient) -> None:
    resp = api.options(
        "/v1/chat/completions",
        headers={
            "origin": "http://example.test",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization",
        },
    )
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] in ("*", "http://example.test")
    assert "POST" in resp.headers["access-control-allow-methods"]


def test_cors_origins_are_configurable(make_api: object) -> None:
    from loom.api.config import CorsConfig

    with make_api(cors=CorsConfig(allowed_origins=("http://ok.test",))) as api:  # type: ignore[operator]
        ok = api.get("/v1/models", headers={"origin": "http://ok.test"})
        other = api.get("/v1/models", headers={"origin": "http://evil.test"})
    assert ok.headers.get("access-control-allow-origin") == "http://ok.test"
    assert "access-control-allow-origin" not in other.headers


def test_tokenize_a_prompt_and_back(api: TestClient) -> None:
    resp = api.post("/tokenize", json={"model": "toy", "prompt": "abc", "return_token_strs": True})
    assert resp.status_code == 200
    body = resp.json()
    assert body["tokens"] == [0, 1, 2] and body["count"] == 3 and body["token_strs"] == ["a", "b", "c"]
    assert body["max_model_len"] == 4096
    assert api.post("/detokenize", json={"model": "toy", "tokens": [2, 1, 0]}).json() == {"prompt": "cba"}


def test_tokenize_messages_renders_the_template(api: TestClient) -> None:
    resp = api.post("/tokenize", json={"messages": [{"role": "user", "content": "ab"}]})
    assert resp.status_code == 200
    assert resp.json()["count"] > 2  # the template's markup around "ab"


@pytest.mark.parametrize(
    "body",
    [
        {"tokens": [EOS + 1]},
        {"tokens": [-1]},
        {"tokens": ["1"]},
    ],
)
def test_detokenize_refuses_ids_outside_the_vocabulary(api: TestClient, body: dict[str, object]) -> None:
    resp = api.post("/detokenize", json=body)
    assert resp.status_code == 422
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_tokenize_needs_exactly_one_input(api: TestClient) -> None:
    assert api.post("/tokenize", json={}).status_code == 400
    both = {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}
    assert api.post("/tokenize", json=both).status_code == 400
