"""Several server processes on one database and one Redis: one balance, one rate limit, one schema."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import REDIS_URL

from loom.platform.db import Account, Usage
from loom.platform.keys import create_key
from loom.platform.ledger import add_credit, set_price
from loom.platform.money import Price
from loom.platform.store import Database

APP = Path(__file__).with_name("platform_app.py")
BODY = {"model": "m", "prompt": 100, "max_tokens": 50, "n": 2, "produce": 100}  # costs its whole hold: 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def servers(fresh_db_url: str, limits_scope: str) -> Iterator[list[str]]:
    """Two server processes started together on a database no one has migrated yet."""
    ports = [_free_port(), _free_port()]
    procs = [
        subprocess.Popen([sys.executable, str(APP), fresh_db_url, str(port), REDIS_URL, limits_scope]) for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        deadline = time.monotonic() + 60
        for url, proc in zip(urls, procs, strict=True):
            while True:
                assert proc.poll() is None, "a server process exited during start-up"
                assert time.monotonic() < deadline, "the servers did not start"
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.05)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)


def test_fifty_requests_across_two_servers_share_one_balance_and_one_limit(servers: list[str], fresh_db_url: str) -> None:
    db = Database(fresh_db_url)
    try:
        set_price(db, "m", Price(1_000_000, 500_000, 2_000_000))
        key, _ = create_key(db, "acme", rpm=30)
        add_credit(db, "acme", 300 * 10)
        auth = {"authorization": f"Bearer {key}"}

        def post(i: int) -> int:
            return httpx.post(f"{servers[i % 2]}/v1/work", json=BODY, headers=auth, timeout=30).status_code

        with ThreadPoolExecutor(max_workers=50) as pool:
            statuses = sorted(pool.map(post, range(50)))
        assert statuses == [200] * 10 + [402] * 20 + [429] * 20
        with db.read() as session:
            account = session.query(Account).one()
            assert (account.balance_micros, account.held_micros) == (0, 0)
            assert sorted(row.status for row in session.query(Usage)) == ["ok"] * 10 + ["rejected"] * 20
    finally:
        db.dispose()
