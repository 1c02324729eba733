"""Platform fixtures: every test runs on a fresh SQLite file and on a fresh PostgreSQL schema.

PostgreSQL is the real server at 127.0.0.1:5432 (database `test`, trust auth); each test gets
its own schema (through the URL's `search_path`), dropped afterwards, so tests never see each
other's rows and other users of that database never see ours. Redis (127.0.0.1:6379) tests use
a fresh key scope each.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from loom.platform import Platform, PlatformConfig
from loom.platform.store import Database

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ["sqlite", "postgresql"]


def _pg_schema_url(schema: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL as an operator would type it, to an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'loom.db'}"
        return
    schema = f"loom_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield _pg_schema_url(schema)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """The platform's tables, migrated, on each backend."""
    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture
def limits_scope() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_platform(db_url: str, limits_scope: str) -> Iterator[Callable[..., Platform]]:
    """Opens platforms on this test's database (each call may add config, e.g. a JWT secret)."""
    opened: list[Platform] = []

    def make(**config: Any) -> Platform:
        platform = Platform(PlatformConfig(db_url=db_url, limits_scope=limits_scope, **config))
        opened.append(platform)
        return platform

    yield make
    for platform in opened:
        platform.close()


@pytest.fixture
def platform(make_platform: Callable[..., Platform]) -> Platform:
    return make_platform()
