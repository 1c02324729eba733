"""The platform inside the real `create_app` (toy engine): usage, metrics, headers, open routes."""

from __future__ import annotations

from fastapi.testclient import TestClient
from toy_engine import ToyEngine

from loom.api.app import create_app
from loom.api.config import ServerConfig
from loom.platform import Platform
from loom.platform.keys import create_key


def _client(platform: Platform | None) -> TestClient:
    app = create_app(ServerConfig(served_model_names=("toy",)), ToyEngine(), platform)  # type: ignore[arg-type]
    return TestClient(app, raise_server_exceptions=False)


def test_without_a_platform_nothing_is_required_or_recorded() -> None:
    with _client(None) as client:
        assert client.get("/v1/usage").json() == {"object": "list", "data": [], "has_more": False}
        assert client.get("/metrics").status_code == 200


def test_usage_needs_a_key_once_one_exists_and_health_stays_open(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme", rpm=5)
    with _client(platform) as client:
        assert client.get("/health").status_code == 200
        refused = client.get("/v1/usage")
        assert refused.status_code == 401 and "x-request-id" in refused.headers
        ok = client.get("/api/v1/usage", headers={"x-api-key": key})
        assert ok.status_code == 200 and ok.json()["data"] == []
        assert ok.headers["x-ratelimit-limit-requests"] == "5"
        assert ok.headers["x-ratelimit-remaining-requests"] == "4"
        metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'loom:refused_requests_total{status="401"} 1.0' in text
    assert "vllm:e2e_request_latency_seconds" in text and "vllm:prompt_tokens_total" in text
    assert "acme" not in text and key not in text
