"""Money through the route dependencies: 402 before work, settlement, release on failure, the ledger."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi.testclient import TestClient
from platform_app import live, platform_app
from sqlalchemy import text

from loom.platform import Platform, PlatformConfig
from loom.platform.db import Account
from loom.platform.keys import create_key
from loom.platform.ledger import add_credit, set_price
from loom.platform.money import Price
from loom.platform.store import Database

PRICE = Price(input_micros=1_000_000, cached_input_micros=500_000, output_micros=2_000_000)
BODY = {"model": "m", "prompt": 100, "max_tokens": 50, "n": 2, "produce": 30}  # worst case 300, actual 160


def _funded(platform: Platform, micros: int, account: str = "acme") -> dict[str, str]:
    set_price(platform.db, "m", PRICE)
    key, _ = create_key(platform.db, account)
    add_credit(platform.db, account, micros)
    return {"authorization": f"Bearer {key}"}


def _balance(platform: Platform, account: str = "acme") -> tuple[int, int]:
    with platform.db.read() as session:
        row = session.query(Account).filter_by(name=account).one()
        return row.balance_micros, row.held_micros


def _usage(client: TestClient, auth: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    response = client.get("/v1/usage", headers=auth, params=params)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_request_is_billed_its_actual_tokens_and_recorded(platform: Platform) -> None:
    auth = _funded(platform, 1_000)
    with TestClient(platform_app(platform)) as client:
        response = client.post("/v1/work", json={**BODY, "cached": 40, "request_id": "mine", "user": "u"}, headers=auth)
        assert response.json()["cost_micros"] == 60 + 20 + 60
        assert _balance(platform) == (860, 0)
        [record] = _usage(client, auth)
    assert record["id"] == response.json()["hold_id"]
    assert (record["request_id"], record["user"], record["status"], record["cost_usd"]) == ("mine", "u", "ok", "0.000140")
    assert (record["prompt_tokens"], record["cached_tokens"], record["completion_tokens"]) == (100, 40, 30)


def test_insufficient_balance_is_402_before_work_and_costs_nothing(platform: Platform) -> None:
    auth = _funded(platform, 299)
    with TestClient(platform_app(platform)) as client:
        response = client.post("/v1/work", json=BODY, headers=auth)
        assert response.status_code == 402
        assert response.json()["error"]["type"] == "insufficient_quota"
        assert _balance(platform) == (299, 0)
        [record] = _usage(client, auth)
        assert (record["status"], record["cost_micros"]) == ("rejected", 0)
        assert client.post("/v1/work", json={**BODY, "max_tokens": 49, "n": 2}, headers=auth).status_code == 200


def test_a_failed_request_releases_its_hold_free(platform: Platform) -> None:
    auth = _funded(platform, 1_000)
    with TestClient(platform_app(platform), raise_server_exceptions=False) as client:
        assert client.post("/v1/work", json={**BODY, "fail": True}, headers=auth).status_code == 500
        assert _balance(platform) == (1_000, 0)
        [record] = _usage(client, auth)
        assert (record["status"], record["cost_micros"]) == ("error", 0)


def test_a_streamed_request_settles_when_its_stream_ends(platform: Platform) -> None:
    auth = _funded(platform, 1_000)
    with TestClient(platform_app(platform)) as client:
        response = client.post("/v1/work", json={**BODY, "stream": True}, headers=auth)
        assert response.text.count("data: ") == 30
        assert _balance(platform) == (840, 0)
        [record] = _usage(client, auth)
        assert (record["status"], record["completion_tokens"], record["cost_micros"]) == ("ok", 30, 160)


def test_a_client_that_leaves_a_stream_pays_for_what_was_produced(platform: Platform) -> None:
    auth = _funded(platform, 10_000)
    body = {**BODY, "stream": True, "max_tokens": 1000, "produce": 2000, "delay": 0.01}
    with live(platform_app(platform)) as base_url:
        with httpx.stream("POST", f"{base_url}/v1/work", json=body, headers=auth, timeout=10) as response:
            received = 0
            for line in response.iter_lines():
                received += line.startswith("data: ")
                if received == 5:
                    break  # leaving closes the connection
        deadline = time.monotonic() + 10
        while _balance(platform)[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        [record] = httpx.get(f"{base_url}/v1/usage", headers=auth).json()["data"]
    assert record["status"] == "client_disconnected"
    assert 5 <= record["completion_tokens"] < 2000
    assert record["cost_micros"] == 100 + 2 * record["completion_tokens"]
    assert _balance(platform) == (10_000 - record["cost_micros"], 0)


def test_usage_lists_only_the_callers_own_records_newest_first(platform: Platform) -> None:
    mine = _funded(platform, 10_000)
    theirs = _funded(platform, 10_000, account="other")
    with TestClient(platform_app(platform)) as client:
        for i in range(3):
            client.post("/v1/work", json={**BODY, "request_id": f"m{i}"}, headers=mine)
        client.post("/v1/work", json={**BODY, "request_id": "t0"}, headers=theirs)
        assert [r["request_id"] for r in _usage(client, mine)] == ["m2", "m1", "m0"]
        assert [r["request_id"] for r in _usage(client, theirs)] == ["t0"]
        first = client.get("/v1/usage", headers=mine, params={"limit": 2}).json()
        assert first["has_more"] and [r["request_id"] for r in first["data"]] == ["m2", "m1"]
        rest = client.get("/v1/usage", headers=mine, params={"limit": 2, "before": first["data"][-1]["id"]}).json()
        assert not rest["has_more"] and [r["request_id"] for r in rest["data"]] == ["m0"]
        assert _usage(client, theirs, before=first["data"][0]["id"]) == []  # another account's cursor finds nothing
        assert client.get("/v1/usage", headers=mine, params={"limit": 0}).status_code == 422


def test_fifty_parallel_requests_against_ten_never_overdraw(platform: Platform) -> None:
    """Each request costs its whole hold (100 prompt + 2 x 50 output tokens = 300), so exactly ten fit."""
    auth = _funded(platform, 300 * 10)
    with TestClient(platform_app(platform)) as client, ThreadPoolExecutor(max_workers=50) as pool:
        statuses = list(pool.map(lambda _: client.post("/v1/work", json={**BODY, "produce": 100}, headers=auth).status_code, range(50)))
    assert sorted(statuses) == [200] * 10 + [402] * 40
    assert _balance(platform) == (0, 0)


def test_a_database_failure_is_a_plain_503(fresh_db_url: str) -> None:
    platform = Platform(PlatformConfig(db_url=fresh_db_url))  # migrates its own schema, which this test breaks
    auth = _funded(platform, 1_000)
    with platform.db.write() as session:
        session.execute(text("DROP TABLE api_keys" + ("" if platform.db.is_sqlite else " CASCADE")))
    with TestClient(platform_app(platform), raise_server_exceptions=False) as client:
        response = client.post("/v1/work", json=BODY, headers=auth)
        assert response.status_code == 503, response.text
        assert "api_keys" not in response.text
        assert "select" not in response.text.lower() and "insert" not in response.text.lower()


def test_open_server_bills_no_one(platform: Platform) -> None:
    with TestClient(platform_app(platform)) as client:
        response = client.post("/v1/work", json=BODY)
        assert response.json() == {"cost_micros": None, "hold_id": None}
        assert client.get("/v1/usage").json()["data"] == []


def test_a_stream_ends_for_its_client_before_its_settlement_is_written(platform: Platform) -> None:
    """The account's row lock (every request of the account queues on it) is no part of a
    stream's latency: the body ends while its settlement waits, and the caller's `/v1/usage`
    (not another tenant's) waits for it."""
    auth = _funded(platform, 10_000)
    theirs = _funded(platform, 10_000, account="other")
    other = Database(platform.db.url)  # another server's transaction holding the account's lock
    account_id = _account_id(platform)
    body = {**BODY, "stream": True, "delay": 0.01}
    with live(platform_app(platform)) as base_url:
        with httpx.stream("POST", f"{base_url}/v1/work", json=body, headers=auth, timeout=10) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            with other.money_transaction() as conn:
                other.lock_account(conn, account_id)
                rest = [line for line in lines if line]  # the body ends although its settlement cannot start
                assert rest[-1] == f"data: {BODY['produce'] - 1}"
                assert _held(conn, account_id) == 300
                # another tenant's usage read does not wait for this settlement
                assert httpx.get(f"{base_url}/v1/usage", headers=theirs, timeout=5).json()["data"] == []
        [record] = httpx.get(f"{base_url}/v1/usage", headers=auth, timeout=10).json()["data"]
    other.dispose()
    assert (record["status"], record["cost_micros"]) == ("ok", 160)
    assert _balance(platform) == (10_000 - 160, 0)


def _account_id(platform: Platform, account: str = "acme") -> int:
    with platform.db.read() as session:
        return session.query(Account).filter_by(name=account).one().id


def _held(conn: Any, account_id: int) -> int:
    return int(conn.execute(text("SELECT held_micros FROM accounts WHERE id = :id"), {"id": account_id}).scalar_one())
