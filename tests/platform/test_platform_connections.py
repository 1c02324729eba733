"""PostgreSQL connections: an idle pooled connection the server cut is replaced before a request
uses it, and the holds' lazy-commit pool keeps the operator's own connection options."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import create_engine, text

from loom.platform import ledger, store
from loom.platform.keys import create_key, find_key
from loom.platform.money import Price
from loom.platform.store import Database
from loom.platform.types import Estimate, Held, Principal

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _backend_pids(db: Database) -> set[int]:
    with db.lookup() as conn:
        return {conn.execute(text("SELECT pg_backend_pid()")).scalar_one()}


def test_an_idle_connection_the_server_cut_is_replaced(migrated_pg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(migrated_pg)
    key, _ = create_key(db, f"acme-{uuid.uuid4().hex}")
    assert find_key(db, key) is not None
    pids = _backend_pids(db)
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:  # what a database restart or a firewall does to an idle connection
        for pid in pids:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    monkeypatch.setattr(store, "_PING_AFTER_IDLE_S", 0.0)  # every checkout counts as after a long idle
    assert find_key(db, key) is not None
    assert _backend_pids(db).isdisjoint(pids)
    db.dispose()


def test_holds_commit_lazily_on_the_operators_schema(migrated_pg: str) -> None:
    db = Database(migrated_pg)  # the URL carries `options=-csearch_path=...`
    name = f"acme-{uuid.uuid4().hex}"  # this schema is shared with other tests, not emptied for this one
    ledger.set_price(db, name, Price(1_000_000, 1_000_000, 1_000_000))
    account = ledger.add_credit(db, name, 1_000)
    who = Principal(account_id=account.id, account_name=name)
    with db.account_lock(account.id, durable=False) as (conn, _):
        assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
    with db.account_lock(account.id) as (conn, _):
        assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
    assert ledger.hold(db, name[:32], who, Estimate(name, 100, 10)) == Held(name[:32], 110)
    assert ledger.find_account(db, name).balance_micros == 890  # type: ignore[union-attr]
    db.dispose()
