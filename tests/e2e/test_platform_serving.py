"""The provider platform through the real server and the default model, on a SQLite file: every
credential form, 402 and 429 before any work, overload 503 and recovery, a client that leaves
paying for what was made (streamed and blocking), usage rows equal to the usage each answer
showed, `/v1/usage` limited to the caller, the prefix cache salted per account, `/metrics`.

One engine of its own (one running sequence, at most one waiting: the overload test fills it);
every test uses its own account. Answers are a few tokens long.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import LiveServer, engine_is_idle

from loom.platform import Platform, PlatformConfig, Principal
from loom.platform.db import Account
from loom.platform.keys import create_key, revoke_key
from loom.platform.ledger import add_credit, find_account, set_price
from loom.platform.money import Price

MODEL = "SmolLM2-135M-Instruct"
JWT_SECRET = "e2e-" + "s" * 40
PRICE = Price(input_micros=1_000_000, cached_input_micros=500_000, output_micros=2_000_000)  # micros a token: 1, 0.5, 2
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    path: Path = tmp_path_factory.mktemp("platform") / "loom.db"
    config = PlatformConfig(
        db_url=f"sqlite:///{path}", jwt_secret=JWT_SECRET, max_queued_requests=1, limits_scope=uuid.uuid4().hex
    )
    opened = Platform(config)
    set_price(opened.db, MODEL, PRICE)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def live(platform: Platform, start_server: Callable[..., AbstractContextManager[LiveServer]]) -> Iterator[LiveServer]:
    with start_server(platform=platform, max_num_seqs=1) as server:
        yield server


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.base_url, timeout=TIMEOUT_S) as client:
        yield client


def account(platform: Platform, micros: int = 1_000_000, **limits: Any) -> tuple[str, dict[str, str]]:
    name = f"acct-{uuid.uuid4().hex[:8]}"
    key, _ = create_key(platform.db, name, **limits)
    add_credit(platform.db, name, micros)
    return name, {"authorization": f"Bearer {key}"}


def chat(prompt: str = "Say hi.", **fields: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 3,
        "temperature": 0,
        **fields,
    }


def balance(platform: Platform, name: str) -> tuple[int, int]:
    with platform.db.read() as session:
        row = session.query(Account).filter_by(name=name).one()
        return row.balance_micros, row.held_micros


def rows(http: httpx.Client, auth: dict[str, str]) -> dict[str, dict[str, Any]]:
    response = http.get("/v1/usage", headers=auth)
    assert response.status_code == 200, response.text
    return {row["request_id"]: row for row in response.json()["data"]}


def tokens(row: dict[str, Any]) -> tuple[int, int, int]:
    return row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]


def shown(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"]


def cost(prompt: int, cached: int, completion: int) -> int:
    return -(-((prompt - cached) * 2 + cached + completion * 4) // 2)  # in half-micros, rounded up once


def settled(platform: Platform, name: str) -> tuple[int, int]:
    """The account once no hold is open (a request that lost its client settles just after)."""
    deadline = time.monotonic() + 15
    while (now := balance(platform, name))[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


def test_every_credential_form_and_revocation(platform: Platform, http: httpx.Client) -> None:
    name, auth = account(platform)
    key = auth["authorization"].split()[1]
    token = jwt.encode({"sub": name, "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")
    for headers in (auth, {"authorization": f"bearer {key}"}, {"x-api-key": key}, {"token": token}):
        assert http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=headers).status_code == 200
    expired = jwt.encode({"sub": name, "exp": int(time.time()) - 60}, JWT_SECRET, algorithm="HS256")
    unsigned = jwt.encode({"sub": name, "exp": int(time.time()) + 60}, None, algorithm="none")
    for status, headers in (
        (401, {}),
        (401, {"token": expired}),
        (401, {"token": unsigned}),
        (400, {**auth, "token": token}),
    ):
        refused = http.post("/v1/chat/completions", json=chat(), headers=headers)
        assert refused.status_code == status, refused.text
        assert refused.headers["x-request-id"] and key not in refused.text and token not in refused.text
    assert http.get("/health").status_code == 200
    revoke_key(platform.db, key)
    assert http.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 401
    assert (
        http.post("/v1/chat/completions", json=chat(), headers={"token": token}).status_code == 200
    )  # the account lives on


def test_usage_rows_equal_what_each_answer_showed(platform: Platform, http: httpx.Client) -> None:
    name, auth = account(platform)
    _, other = account(platform)
    prompt = "Name three colours of the rainbow, please, in a short list. " * 3  # a few full KV blocks
    blocking = http.post("/v1/chat/completions", json=chat(prompt, request_id="b", user="alice"), headers=auth)
    assert blocking.status_code == 200, blocking.text
    with http.stream(
        "POST", "/v1/chat/completions", headers=auth,
        json=chat(prompt, request_id="s", stream=True, stream_options={"include_usage": True}),
    ) as response:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    completions = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ["Once upon", "a time"], "max_tokens": 2, "request_id": "c"},
        headers=auth,
    )
    assert completions.status_code == 200, completions.text
    theirs = http.post("/v1/chat/completions", json=chat(prompt, request_id="o"), headers=other)
    mine = rows(http, auth)
    assert set(mine) == {"b", "s", "c"} and set(rows(http, other)) == {"o"}
    assert tokens(mine["b"]) == shown(blocking.json()["usage"])
    assert tokens(mine["s"]) == shown(chunks[-1]["usage"])
    assert tokens(mine["c"]) == shown(completions.json()["usage"])
    assert mine["s"]["cached_tokens"] > 0  # the same account's prompt, again: served from its cache
    assert shown(theirs.json()["usage"])[1] == 0  # another account never hits it
    assert all(row["status"] == "ok" and row["cost_micros"] == cost(*tokens(row)) for row in mine.values())
    assert mine["b"]["user"] == "alice"
    assert settled(platform, name) == (1_000_000 - sum(row["cost_micros"] for row in mine.values()), 0)


def test_broke_is_402_and_over_the_rate_is_429_with_headers(platform: Platform, http: httpx.Client) -> None:
    name, auth = account(platform, micros=100, rpm=3)
    broke = http.post("/v1/chat/completions", json=chat(max_tokens=200), headers=auth)  # worst case > 100 micros
    assert broke.status_code == 402 and broke.json()["error"]["type"] == "insufficient_quota"
    assert http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth).status_code == 200
    last = http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth)
    assert last.headers["x-ratelimit-limit-requests"] == "3" and last.headers["x-ratelimit-remaining-requests"] == "0"
    limited = http.post("/v1/chat/completions", json=chat(max_tokens=1), headers=auth)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    records = platform.usage_records(Principal(find_account(platform.db, name).id, name), limit=10)  # type: ignore[union-attr]
    assert sorted(r.status for r in records) == ["ok", "ok", "rejected"]  # the 429 wrote no row
    assert balance(platform, name) == (100 - sum(r.cost_micros for r in records), 0)


def test_a_client_that_leaves_pays_for_what_was_made(platform: Platform, live: LiveServer, http: httpx.Client) -> None:
    name, auth = account(platform)
    long = chat("Tell me a very long story about the sea.", max_tokens=1000, ignore_eos=True)
    seen = 0
    with http.stream(
        "POST", "/v1/chat/completions", json={**long, "stream": True, "request_id": "s"}, headers=auth
    ) as response:
        for line in response.iter_lines():
            seen += _has_content(line)
            if seen == 4:
                break  # leaving closes the connection mid-stream
    assert _until(lambda: engine_is_idle(live.engine))
    first_outputs = live.engine.stats().prefix_cache_queries  # grows when a request's first token arrives
    with _sent(live.base_url, {**long, "request_id": "b"}, auth):  # a blocking client that leaves ...
        assert _until(lambda: live.engine.stats().prefix_cache_queries > first_outputs)  # ... once tokens exist
    assert settled(platform, name)[1] == 0
    mine = rows(http, auth)
    for request_id, least in (("s", seen), ("b", 1)):
        row = mine[request_id]
        assert row["status"] == "client_disconnected", row
        assert least <= row["completion_tokens"] < 1000 and row["cost_micros"] == cost(*tokens(row))
    assert balance(platform, name)[0] == 1_000_000 - mine["s"]["cost_micros"] - mine["b"]["cost_micros"]
    assert _until(lambda: engine_is_idle(live.engine))


def test_overload_is_503_before_any_hold_and_recovers(platform: Platform, live: LiveServer, http: httpx.Client) -> None:
    name, auth = account(platform)
    long = chat("Count to a thousand.", max_tokens=1000, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=long, headers=auth) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the response
        while not _has_content(next(lines)):
            pass  # the first is generating (the engine runs one sequence at a time) ...
        with http.stream("POST", "/v1/chat/completions", json=long, headers=auth):
            assert _until(lambda: live.engine.stats().num_waiting == 1)  # ... the second waits: the queue is full
            held = balance(platform, name)
            refused = http.post("/v1/chat/completions", json=chat(), headers=auth)
            assert refused.status_code == 503, refused.text
            assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["code"] == "server_overloaded"
            assert balance(platform, name) == held  # no hold was placed
    assert _until(lambda: engine_is_idle(live.engine))
    assert http.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 200  # by itself, once it drained
    assert 'loom:refused_requests_total{status="503"}' in http.get("/metrics").text


def test_metrics_count_tokens_and_refusals_without_naming_anyone(platform: Platform, http: httpx.Client) -> None:
    name, auth = account(platform, micros=100, rpm=2)
    before = _scrape(http)
    assert http.post("/v1/chat/completions", json=chat(), headers={"x-api-key": "sk-loom-nobody"}).status_code == 401
    assert http.post("/v1/chat/completions", json=chat(max_tokens=500), headers=auth).status_code == 402
    answer = http.post("/v1/chat/completions", json=chat(max_tokens=2, stream=True), headers=auth)
    assert http.post("/v1/chat/completions", json=chat(), headers=auth).status_code == 429
    after, text = _scrape(http), http.get("/metrics").text
    for status in ("401", "402", "429"):
        assert (
            after[f'loom:refused_requests_total{{status="{status}"}}']
            == before.get(f'loom:refused_requests_total{{status="{status}"}}', 0) + 1
        )
    generated = f'vllm:generation_tokens_total{{model_name="{MODEL}"}}'
    assert answer.status_code == 200 and after[generated] == before[generated] + 2
    assert after[f'vllm:time_to_first_token_seconds_count{{model_name="{MODEL}"}}'] > 0
    assert f'vllm:num_requests_waiting{{model_name="{MODEL}"}} 0.0' in text
    assert name not in text and "acct-" not in text and "sk-loom" not in text


def _scrape(http: httpx.Client) -> dict[str, float]:
    samples = {}
    for line in http.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            samples[sample] = float(value)
    return samples


@contextmanager
def _sent(base_url: str, body: dict[str, Any], headers: dict[str, str]) -> Iterator[None]:
    """Sends a chat request on a raw connection and closes it when the block ends, unanswered."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "content-type": "application/json"}.items())
    request = f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-length: {len(payload)}\r\n{head}\r\n"
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(request.encode() + payload)
        yield


def _until(condition: Callable[[], bool], timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def _has_content(sse_line: str) -> bool:
    return '"content":"' in sse_line and '"content":""' not in sse_line
