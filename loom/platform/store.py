"""Where the platform's data lives: database URLs, connections, migrations, and the one row lock.

Owns turning what an operator types (`--db`, `LOOM_DB`, nothing) into a SQLAlchemy engine:
SQLite by default (a WAL file under the user's data directory), PostgreSQL for
`postgresql://...` URLs (driver: psycopg 3). Owns the transaction helpers every platform write
goes through, and `lock_account`, the one place an account row is locked: `SELECT ... FOR UPDATE`
on PostgreSQL; on SQLite the write transaction itself starts with `BEGIN IMMEDIATE`, which takes
the database's write lock before the first read, so a balance read is never stale. Never decides
what a request costs and never holds a session across a request.

Every request runs through `lookup` (authentication) and `money_transaction` + `lock_account`
(hold, settle) on plain SQLAlchemy Core connections, not ORM sessions: the ORM cost ~10 ms of CPU per request on the
2-core benchmark machine, CPU the engine lost. PostgreSQL connections are pinged before use only
after sitting idle (`_PING_AFTER_IDLE_S`), not on every checkout.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, create_engine, event, select, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from loom.platform.db import Account

DB_ENV = "LOOM_DB"
_WRITE_OPTION = "loom_write"  # execution option marking a write transaction (BEGIN IMMEDIATE on SQLite)
_SQLITE_BUSY_TIMEOUT_S = 30.0  # other writers hold the lock for milliseconds; wait rather than fail
_MIGRATIONS = Path(__file__).parent / "migrations"
_PING_AFTER_IDLE_S = 10.0  # a pooled connection unused this long is checked before a request gets it
_LAST_USED = "loom_last_used"
_LOCK_ACCOUNT = (
    select(Account.balance_micros, Account.held_micros).where(Account.id == bindparam("id")).with_for_update()
)


@dataclass(frozen=True, slots=True)
class AccountMoney:
    """An account's money as read under its row lock."""

    balance_micros: int
    held_micros: int


def default_sqlite_path() -> Path:
    import platformdirs

    return platformdirs.user_data_path("loom") / "loom.db"


def resolve_url(url: str | None = None) -> URL:
    """`--db` value, else `LOOM_DB`, else the default SQLite file. A bare path means a SQLite file."""
    raw = url or os.environ.get(DB_ENV) or str(default_sqlite_path())
    if "://" not in raw:
        return URL.create("sqlite", database=str(Path(raw).expanduser().resolve()))
    parsed = make_url(raw)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def describe(url: URL) -> str:
    """The URL without its password, for start-up lines and errors."""
    return url.render_as_string(hide_password=True)


class Database:
    """One SQLAlchemy engine and its sessions; safe to share between threads."""

    def __init__(self, url: str | URL | None = None) -> None:
        self.url = url if isinstance(url, URL) else resolve_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = _sqlite_engine(self.url) if self.is_sqlite else _server_engine(self.url)
        self._writes = self.engine.execution_options(**{_WRITE_OPTION: True})
        # one statement needs no transaction on PostgreSQL: no BEGIN / COMMIT round trips
        self._lookups = self.engine if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        # PostgreSQL: a second pool whose sessions commit without waiting for the WAL flush, set
        # when each connection opens (no SET per transaction)
        self._lazy_writes = self._writes if self.is_sqlite else _server_engine(self.url, synchronous_commit=False)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self._writes, expire_on_commit=False)
        # SQLite lets one writer in at a time, and its busy handler makes the others sleep in
        # growing steps (up to 100 ms each): 32 requests holding at once left some waiting for
        # seconds. This process's writers queue on a lock instead; other processes still meet
        # the busy handler.
        self._sqlite_writer: AbstractContextManager[object] = threading.Lock() if self.is_sqlite else nullcontext()

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A short read-only transaction."""
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, committed when the block ends, rolled back if it raises."""
        with self._sqlite_writer, self._write() as session, session.begin():
            yield session

    @contextmanager
    def lookup(self) -> Iterator[Connection]:
        """A connection for one read statement (a consistent snapshot of that statement only)."""
        with self._lookups.connect() as conn:
            yield conn

    @contextmanager
    def account_lock(
        self, account_id: int, *, durable: bool = True
    ) -> Iterator[tuple[Connection, AccountMoney | None]]:
        """A write transaction holding `account_id`'s row lock until it ends: every change of
        money goes through here (or through `money_transaction` + `lock_account`), so two
        changes of one account never interleave."""
        with self.money_transaction(durable=durable) as conn:
            yield conn, self.lock_account(conn, account_id)

    @contextmanager
    def money_transaction(self, *, durable: bool = True) -> Iterator[Connection]:
        """A write transaction for reads that need no lock, then `lock_account`, then the change.

        `durable=False` lets PostgreSQL commit without waiting for the WAL flush (the transaction
        stays atomic; a crash may lose the last fraction of a second of such commits). The row
        lock is held through the commit, so one account's concurrent requests queue behind each
        flush: measured 32 holds at once ~200 ms synchronous. Only for a change whose loss in a
        crash is harmless (a hold: it vanishes with its request, balance and hold together)."""
        with self._sqlite_writer, (self._writes if durable else self._lazy_writes).begin() as conn:
            yield conn

    def lock_account(self, conn: Connection, account_id: int) -> AccountMoney | None:
        """The one place an account row is locked (until `conn`'s transaction ends)."""
        row = conn.execute(_LOCK_ACCOUNT, {"id": account_id}).first()
        return AccountMoney(row.balance_micros, row.held_micros) if row is not None else None

    def upgrade(self) -> None:
        """Applies every Alembic migration not yet applied (several processes may race: they queue)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.execution_options(**{_WRITE_OPTION: True}).connect() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, "alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()

    def dispose(self) -> None:
        self.engine.dispose()
        self._lazy_writes.engine.dispose()


def _sqlite_engine(url: URL) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        hide_parameters=True,  # parameters may hold key hashes or client text: keep them out of errors
        connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # pysqlite's own BEGIN handling off: `_on_begin` decides
        cursor = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        writes = conn.get_execution_options().get(_WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

    return engine


def _server_engine(url: URL, *, synchronous_commit: bool = True) -> Engine:
    connect_args = {}
    if not synchronous_commit:  # libpq's startup options, added to any the operator's URL has
        given = url.query.get("options", "")
        given = " ".join(given) if isinstance(given, tuple) else given
        connect_args["options"] = f"{given} -c synchronous_commit=off".strip()
    engine = create_engine(url, hide_parameters=True, connect_args=connect_args)

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        # a connection in steady use is known to be alive; one that sat idle may have been cut
        # (server restart, firewall): DisconnectionError makes the pool replace it and retry
        if time.monotonic() - record.info.get(_LAST_USED, 0.0) > _PING_AFTER_IDLE_S:
            try:
                engine.dialect.do_ping(dbapi_conn)
            except Exception as exc:
                raise DisconnectionError("idle connection is gone") from exc

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _note_use(_dbapi_conn: Any, record: Any) -> None:
        record.info[_LAST_USED] = time.monotonic()

    return engine
