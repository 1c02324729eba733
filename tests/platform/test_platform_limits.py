"""Rate limits: RPM and TPM per key, in memory and in the real Redis, their headers, and 503 admission."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import REDIS_URL
from fastapi.testclient import TestClient
from platform_app import platform_app

from loom.api.deps import format_reset
from loom.platform import Platform, RateLimited, WindowState
from loom.platform.keys import create_key
from loom.platform.limits import WINDOW_S, RateLimiter, seconds_until_room

BODY = {"model": "m", "prompt": 100, "max_tokens": 50, "n": 2, "produce": 30}  # worst case 200 tokens, actual 130


@pytest.fixture(params=["memory", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str | None:
    return REDIS_URL if request.param == "redis" else None


def test_requests_per_minute_429_with_headers(make_platform: Callable[..., Platform], redis_url: str | None) -> None:
    platform = make_platform(redis_url=redis_url)
    key, _ = create_key(platform.db, "acme", rpm=3, tpm=10_000)
    auth = {"authorization": f"Bearer {key}"}
    with TestClient(platform_app(platform)) as client:
        ok = [client.post("/v1/work", json=BODY, headers=auth) for _ in range(3)]
        refused = client.post("/v1/work", json=BODY, headers=auth)
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in ok] == ["2", "1", "0"]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "3"
    assert ok[0].headers["x-ratelimit-limit-tokens"] == "10000"
    assert ok[0].headers["x-ratelimit-remaining-tokens"] == "9800"  # the worst case is counted at admission
    assert ok[1].headers["x-ratelimit-remaining-tokens"] == "9670"  # ... and corrected to 130 at settlement
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= WINDOW_S
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert key not in refused.text


def test_tokens_per_minute_429_and_a_request_that_can_never_fit(make_platform: Callable[..., Platform], redis_url: str | None) -> None:
    platform = make_platform(redis_url=redis_url)
    key, _ = create_key(platform.db, "acme", tpm=300)
    auth = {"authorization": f"Bearer {key}"}
    with TestClient(platform_app(platform)) as client:
        assert client.post("/v1/work", json={**BODY, "produce": 100}, headers=auth).status_code == 200  # uses its whole 200
        refused = client.post("/v1/work", json=BODY, headers=auth)
        too_large = client.post("/v1/work", json={**BODY, "max_tokens": 1000}, headers=auth)
        records = client.get("/v1/usage", headers=auth).json()["data"]
    assert refused.status_code == 429 and refused.headers["x-ratelimit-remaining-tokens"] == "100"
    assert too_large.status_code == 429 and "larger than your per-minute limit" in too_large.json()["error"]["message"]
    assert [r["status"] for r in records] == ["rejected", "rejected", "ok"]


def test_unlimited_keys_carry_no_limit_headers(platform: Platform) -> None:
    key, _ = create_key(platform.db, "acme")
    with TestClient(platform_app(platform)) as client:
        response = client.post("/v1/work", json=BODY, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert not any(name.startswith("x-ratelimit") for name in response.headers)


def test_a_refund_returns_tokens_to_the_window(redis_url: str | None, limits_scope: str) -> None:
    limiter = RateLimiter(redis_url, scope=limits_scope)
    assert isinstance(limiter.hit("tokens", 1, 1000, 600), WindowState)
    assert isinstance(limiter.hit("tokens", 1, 1000, 600), RateLimited)
    limiter.refund("tokens", 1, 1000, 400)
    assert limiter.state("tokens", 1, 1000).remaining == 800
    limiter.refund("tokens", 1, 1000, 10_000)  # never below zero
    assert limiter.state("tokens", 1, 1000).remaining == 1000


def test_overload_is_503_with_retry_after_and_recovers(make_platform: Callable[..., Platform]) -> None:
    platform = make_platform(max_queued_requests=4)
    waiting = [4]
    with TestClient(platform_app(platform, lambda: waiting[0])) as client:
        refused = client.post("/v1/work", json=BODY)
        waiting[0] = 3
        recovered = client.post("/v1/work", json=BODY)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "server_overloaded"
    assert recovered.status_code == 200


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ((0, 0.0, 0, 0.0), 0.0),  # nothing counted
        ((0, 0.0, 10, 90.0), 30.0),  # a full current window: room as soon as it ends (30 s)
        ((0, 0.0, 20, 90.0), 30.0 + 30.0),  # an overfull one (a refund lost a race): 20 must fade to under 10
        ((10, 54.0, 5, 100.0), 24.0),  # 10 fading over 54 s + 5: below 10 - 5 - 1 + 1 = 5 once 10 * ttl/60 < 5
        ((10, 54.0, 8, 70.0), 10.0),  # no room before the current window ends (10 s); then 8 fading leaves room
    ],
)
def test_seconds_until_room_of_one_more_request(window: tuple[int, float, int, float], expected: float) -> None:
    assert seconds_until_room(*window, limit=10, cost=1) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (59.99, "60s"), (360, "6m0s"), (61.2, "1m2s")])
def test_reset_durations_read_like_openais(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text
