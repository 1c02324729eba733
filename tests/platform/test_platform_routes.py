"""The platform on the real generating routes (`create_app` over the toy engine), on both databases:
chat and completions, blocking and streamed, are billed exactly the usage they report; every
refusal comes before the engine and costs nothing; the prefix cache is salted per account."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient
from toy_engine import ToyEngine

from loom.api.app import create_app
from loom.api.config import ServerConfig
from loom.engine import EngineStats, RequestOutput, SamplingParams
from loom.platform import Platform
from loom.platform.db import Account
from loom.platform.keys import create_key
from loom.platform.ledger import add_credit, set_price
from loom.platform.money import Price

MODEL = "toy"
PRICE = Price(
    input_micros=1_000_000, cached_input_micros=500_000, output_micros=2_000_000
)  # 1 / 0.5 / 2 micros a token
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "ab"}], "max_tokens": 5}


class RecordingToyEngine(ToyEngine):
    """The toy engine that also records each request's cache salt and reports a chosen queue length."""

    def __init__(self) -> None:
        super().__init__(max_model_len=4096)
        self.salts: list[str | None] = []
        self.num_waiting = 0

    def stats(self) -> EngineStats:
        return EngineStats(0, self.num_waiting, 0.0, 0, 0, 0, num_forced_tokens=7)

    async def generate(
        self,
        req_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.salts.append(cache_salt)
        async for out in super().generate(req_id, prompt_ids, params, priority, cache_salt):
            yield out


@pytest.fixture
def engine() -> RecordingToyEngine:
    return RecordingToyEngine()


@pytest.fixture
def client(platform: Platform, engine: RecordingToyEngine) -> Iterator[TestClient]:
    app = create_app(ServerConfig(served_model_names=(MODEL, "org/toy")), engine, platform)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _funded(platform: Platform, micros: int, account: str = "acme", **limits: Any) -> dict[str, str]:
    set_price(platform.db, MODEL, PRICE)
    key, _ = create_key(platform.db, account, **limits)
    add_credit(platform.db, account, micros)
    return {"authorization": f"Bearer {key}"}


def _balance(platform: Platform, account: str = "acme") -> tuple[int, int]:
    with platform.db.read() as session:
        row = session.query(Account).filter_by(name=account).one()
        return row.balance_micros, row.held_micros


def _rows(client: TestClient, auth: dict[str, str]) -> list[dict[str, Any]]:
    response = client.get("/v1/usage", headers=auth)
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


def _tokens(row: dict[str, Any]) -> dict[str, int]:
    return {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "cached_tokens": row["cached_tokens"],
    }


def _shown(usage: dict[str, Any]) -> dict[str, int]:
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "cached_tokens": cached,
    }


def _final_usage(sse: str) -> dict[str, Any]:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return chunks[-1]["usage"]  # type: ignore[no-any-return]


def _cost(usage: dict[str, int]) -> int:
    return (
        usage["prompt_tokens"] - usage["cached_tokens"] + usage["cached_tokens"] // 2 + 2 * usage["completion_tokens"]
    )


def test_chat_is_billed_the_usage_it_reports_blocking_and_streamed(
    platform: Platform, engine: RecordingToyEngine, client: TestClient
) -> None:
    auth = _funded(platform, 100_000)
    blocking = client.post("/v1/chat/completions", json={**CHAT, "request_id": "b1", "user": "u1"}, headers=auth)
    assert blocking.status_code == 200, blocking.text
    streamed = client.post(
        "/api/v1/chat/completions",
        json={**CHAT, "request_id": "s1", "stream": True, "stream_options": {"include_usage": True}},
        headers=auth,
    )
    assert streamed.status_code == 200
    rows = {row["request_id"]: row for row in _rows(client, auth)}
    assert _tokens(rows["b1"]) == _shown(blocking.json()["usage"])
    assert _tokens(rows["s1"]) == _shown(_final_usage(streamed.text))
    assert (rows["b1"]["status"], rows["b1"]["user"], rows["s1"]["status"]) == ("ok", "u1", "ok")
    assert [rows[r]["cost_micros"] for r in ("b1", "s1")] == [_cost(_tokens(rows[r])) for r in ("b1", "s1")]
    assert _balance(platform) == (100_000 - rows["b1"]["cost_micros"] - rows["s1"]["cost_micros"], 0)
    assert blocking.headers["x-request-id"] == "b1"


def test_completions_are_billed_over_every_prompt(
    platform: Platform, engine: RecordingToyEngine, client: TestClient
) -> None:
    auth = _funded(platform, 100_000)
    body = {"model": "org/toy", "prompt": ["ab", "abc"], "max_tokens": 3, "n": 2}
    blocking = client.post("/v1/completions", json={**body, "request_id": "c1"}, headers=auth)
    assert blocking.status_code == 200, blocking.text
    assert blocking.json()["usage"]["completion_tokens"] == 4  # 2 prompts x n 2, one toy token each
    streamed = client.post(
        "/v1/completions",
        json={**body, "request_id": "c2", "stream": True, "stream_options": {"include_usage": True}},
        headers=auth,
    )
    rows = {row["request_id"]: row for row in _rows(client, auth)}
    assert _tokens(rows["c1"]) == _shown(blocking.json()["usage"])
    assert _tokens(rows["c2"]) == _shown(_final_usage(streamed.text))
    assert rows["c1"]["model"] == MODEL  # billed under the served model's first name, whatever alias was sent
    assert _balance(platform)[1] == 0


def test_the_prefix_cache_is_salted_per_account(
    platform: Platform, engine: RecordingToyEngine, client: TestClient
) -> None:
    acme = _funded(platform, 10_000)
    other = _funded(platform, 10_000, account="other")
    for auth in (acme, other):
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        assert client.post("/v1/chat/completions", json={**CHAT, "cache_salt": "s"}, headers=auth).status_code == 200
    salts = engine.salts
    assert len(set(salts)) == 4 and all(salt is not None and salt.startswith("account:") for salt in salts)
    assert salts[1] == f"{salts[0]}:s" and salts[3] == f"{salts[2]}:s"


def test_refusals_come_before_the_engine_and_cost_nothing(
    platform: Platform, engine: RecordingToyEngine, client: TestClient
) -> None:
    auth = _funded(
        platform, 30, rpm=4, models=["org/toy"]
    )  # 30 micros: a prompt and a few tokens; the 404, 402s and 200 count
    key = auth["authorization"].split()[1]
    cases = [
        (401, {}, CHAT),
        (401, {"authorization": "Bearer sk-loom-wrong"}, CHAT),
        (400, {**auth, "x-api-key": "sk-loom-other"}, CHAT),
        (404, auth, {**CHAT, "model": "nope"}),
        (402, auth, {**CHAT, "max_tokens": None}),  # the worst case is the whole context window
        (402, auth, {**CHAT, "max_tokens": 50}),
    ]
    for status, headers, body in cases:
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == status, (status, response.text)
        assert "x-request-id" in response.headers and key not in response.text
        assert set(response.json()["error"]) >= {"message", "type", "code"}
    assert engine.requests == []
    assert _balance(platform) == (30, 0)
    assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200  # 'toy' is 'org/toy'
    limited = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert (
        limited.headers["x-ratelimit-limit-requests"] == "4"
        and limited.headers["x-ratelimit-remaining-requests"] == "0"
    )
    assert len(engine.requests) == 1


def test_a_key_limited_to_other_models_gets_the_unknown_model_answer(platform: Platform, client: TestClient) -> None:
    auth = _funded(platform, 10_000, models=["llama"])
    refused = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    unknown = client.post("/v1/chat/completions", json={**CHAT, "model": "llama"}, headers=auth)
    assert refused.status_code == unknown.status_code == 404
    assert refused.json()["error"]["message"].replace(MODEL, "X") == unknown.json()["error"]["message"].replace(
        "llama", "X"
    )


def test_overload_is_503_before_any_hold_and_recovers(make_platform: Any, engine: RecordingToyEngine) -> None:
    platform = make_platform(max_queued_requests=3)
    auth = _funded(platform, 10_000)
    app = create_app(ServerConfig(served_model_names=(MODEL,)), engine, platform)  # type: ignore[arg-type]
    with TestClient(app, raise_server_exceptions=False) as client:
        engine.num_waiting = 3
        refused = client.post("/v1/chat/completions", json=CHAT, headers=auth)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert _balance(platform) == (10_000, 0) and engine.requests == []
        engine.num_waiting = 2
        assert client.post("/v1/chat/completions", json=CHAT, headers=auth).status_code == 200
        metrics = client.get("/metrics").text
    assert 'loom:refused_requests_total{status="503"} 1.0' in metrics
    assert 'vllm:num_requests_waiting{model_name="toy"} 2.0' in metrics
    assert 'loom:grammar_forced_tokens_total{model_name="toy"} 7.0' in metrics
    assert 'vllm:request_success_total{finished_reason="length",model_name="toy"} 1.0' in metrics
