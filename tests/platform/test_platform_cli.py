"""The admin commands exactly as an operator types them, on each database."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from loom.cli import main as loom_main
from loom.platform.db import ApiKey, Base
from loom.platform.keys import find_key, hash_key
from loom.platform.store import Database, resolve_url
from loom.platform_cli import admin_main


def _run(capsys: pytest.CaptureFixture[str], db_url: str, *argv: str) -> tuple[int, str, str]:
    code = admin_main([*argv, "--db", db_url])
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_create_prints_the_key_last_and_stores_only_its_hash(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    code, out, _ = _run(capsys, db_url, "keys", "create", "--account", "acme", "--rpm", "5", "--tpm", "900", "--models", "m1,m2", "--name", "ci")
    assert code == 0
    key = out.strip().splitlines()[-1]
    assert key.startswith("sk-loom-") and len(key) > 40
    db = Database(db_url)
    try:
        row = find_key(db, key)
        assert row is not None and (row.rpm, row.tpm, row.models) == (5, 900, frozenset({"m1", "m2"}))
        with db.read() as session:
            stored = session.query(ApiKey).one()
            assert stored.key_hash == hash_key(key) and key not in (stored.prefix, stored.key_hash)
    finally:
        db.dispose()
    code, out, _ = _run(capsys, db_url, "keys", "list", "--account", "acme")
    assert code == 0 and key not in out and key[:16] in out and "m1,m2" in out
    code, out, _ = _run(capsys, db_url, "keys", "revoke", key[:16])
    assert code == 0 and "revoked" in out
    _, out, _ = _run(capsys, db_url, "keys", "list")
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out.strip().splitlines()[-1])) == 2  # created, revoked


def test_credits_and_prices_are_exact_dollars(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    assert _run(capsys, db_url, "credits", "add", "--account", "acme", "12.345678")[0] == 0
    assert _run(capsys, db_url, "credits", "add", "--account", "acme", "0.000001")[0] == 0
    code, out, _ = _run(capsys, db_url, "credits", "show", "--account", "acme")
    assert code == 0 and "$12.345679" in out
    code, _, err = _run(capsys, db_url, "credits", "add", "--account", "acme", "0.0000001")
    assert code == 1 and "6 decimal places" in err
    code, _, err = _run(capsys, db_url, "credits", "show", "--account", "nobody")
    assert code == 1 and "no account" in err
    assert _run(capsys, db_url, "prices", "set", "org/model", "--input", "0.15", "--cached-input", "0.075", "--output", "0.6")[0] == 0
    code, out, _ = _run(capsys, db_url, "prices", "list")
    assert code == 0 and "org/model" in out and "0.075000" in out and "0.600000" in out


def test_usage_summarises_per_account_key_and_model(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    from loom.platform import Ending, Estimate, FinalUsage, Principal, RequestMeta, ledger
    from loom.platform.money import Price

    _, out, _ = _run(capsys, db_url, "keys", "create", "--account", "acme")
    key = out.strip().splitlines()[-1]
    db = Database(db_url)
    try:
        ledger.set_price(db, "m", Price(1_000_000, 500_000, 2_000_000))
        ledger.add_credit(db, "acme", 10_000)
        row = find_key(db, key)
        assert row is not None
        who = Principal(account_id=row.account_id, account_name="acme", key_id=row.id)
        for i in range(2):
            ledger.hold(db, f"h{i}", who, Estimate("m", 100, 10))
            ledger.close(db, f"h{i}", who.account_id, FinalUsage(100, 20, 10), Ending.OK, RequestMeta(), 3)
    finally:
        db.dispose()
    code, out, _ = _run(capsys, db_url, "usage", "--json", "--since", "2000-01-01")
    [line] = json.loads(out)
    assert code == 0
    assert (line["account"], line["key_prefix"], line["model"], line["requests"]) == ("acme", key[:16], "m", 2)
    assert (line["prompt_tokens"], line["cached_tokens"], line["completion_tokens"]) == (200, 40, 20)
    assert (line["cost_micros"], line["cost_usd"]) == (2 * (80 + 10 + 20), "0.000220")
    code, out, _ = _run(capsys, db_url, "usage", "--account", "acme")
    assert code == 0 and "acme" in out and "0.000220" in out
    assert json.loads(_run(capsys, db_url, "usage", "--json", "--since", "2999-01-01")[1]) == []
    assert _run(capsys, db_url, "usage", "--since", "yesterday")[0] == 1


def test_db_upgrade_brings_the_schema_to_the_models(capsys: pytest.CaptureFixture[str], fresh_db_url: str) -> None:
    code, out, _ = _run(capsys, fresh_db_url, "db", "upgrade")
    assert code == 0 and "0001" in out
    assert _run(capsys, fresh_db_url, "db", "upgrade")[0] == 0  # again: nothing to do
    db = Database(fresh_db_url)
    try:
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        db.dispose()


def test_the_database_comes_from_the_environment_or_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOM_DB", str(tmp_path / "env.db"))
    assert resolve_url(None).database == str(tmp_path / "env.db")
    assert resolve_url("postgresql://u@h:5432/d").drivername == "postgresql+psycopg"
    assert resolve_url("postgres://u@h/d").drivername == "postgresql+psycopg"
    monkeypatch.delenv("LOOM_DB")
    assert resolve_url(None).database.endswith("loom/loom.db")  # type: ignore[union-attr]
    monkeypatch.setenv("LOOM_DB", str(tmp_path / "cli.db"))
    assert loom_main(["credits", "add", "--account", "a", "1"]) == 0  # through `loom` itself
    assert (tmp_path / "cli.db").exists()
