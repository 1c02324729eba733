"""The routes besides the main one: chat path aliases, `GET /v1/models`, `GET /health`."""

from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/chat/completions/", "/api/v1/chat/completions"])
def test_chat_path_aliases_answer_the_same(base_url: str, path: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 6,
        "temperature": 0,
    }
    resp = httpx.post(f"{base_url}{path}", json=body, timeout=120, follow_redirects=False)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"]
    assert resp.headers["x-request-id"] == data["id"]


def test_api_v1_alias_works_with_the_sdk(base_url: str) -> None:
    with openai.OpenAI(base_url=f"{base_url}/api/v1", api_key="x", max_retries=0, timeout=120) as c:
        resp = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
        )
    assert resp.usage is not None and resp.usage.completion_tokens == 3


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct"]
    card = models.data[0]
    assert card.object == "model"
    assert card.owned_by
    assert isinstance(card.created, int)
    assert getattr(card, "max_model_len", None) == 2048


def test_models_raw_shape(base_url: str) -> None:
    body = httpx.get(f"{base_url}/v1/models", timeout=30).json()
    assert body["object"] == "list"
    assert body["data"][0]["id"] == MODEL


def test_health_is_200_while_running(base_url: str) -> None:
    resp = httpx.get(f"{base_url}/health", timeout=30)
    assert resp.status_code == 200
    assert resp.headers.get("x-request-id")


def test_client_request_id_header_is_echoed(base_url: str) -> None:
    resp = httpx.get(f"{base_url}/health", headers={"x-request-id": "trace-123"}, timeout=30)
    assert resp.headers["x-request-id"] == "trace-123"
