"""Platform fixtures: every test runs on an empty SQLite file and on an empty PostgreSQL schema.

PostgreSQL is the real server at 127.0.0.1:5432 (database `test`, trust auth). The session
migrates one schema of its own (through the URL's `search_path`) and empties it before each test
(`TRUNCATE`), dropping it at the end, so tests never see each other's rows and other users of
that database never see ours. SQLite tests get a copy of a migrated file. A test that breaks its
schema on purpose takes `fresh_db_url` instead. Redis (127.0.0.1:6379) tests use a fresh key
scope each.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from loom.platform import Platform, PlatformConfig
from loom.platform.db import Base
from loom.platform.store import Database

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ["sqlite", "postgresql"]


def _pg_schema_url(schema: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"


def _migrated(url: str) -> str:
    database = Database(url)
    database.upgrade()
    database.dispose()
    return url


@pytest.fixture(scope="session")
def pg_schemas() -> Iterator[Callable[[], str]]:
    """Makes fresh PostgreSQL schemas (URLs to them); drops them all when the session ends."""
    admin = create_engine(PG_ADMIN_URL)
    made: list[str] = []

    def make() -> str:
        schema = f"loom_test_{uuid.uuid4().hex[:12]}"
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        made.append(schema)
        return _pg_schema_url(schema)

    yield make
    with admin.begin() as conn:
        for schema in made:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    admin.dispose()


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "loom.db"
    _migrated(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def migrated_pg(pg_schemas: Callable[[], str]) -> str:
    return _migrated(pg_schemas())


def _empty_pg(url: str) -> None:
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    database = Database(url)
    with database.engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
    database.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL as an operator would type it, to an empty, migrated database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "loom.db"
        shutil.copyfile(request.getfixturevalue("migrated_sqlite"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("migrated_pg")
    _empty_pg(url)
    return url


@pytest.fixture(params=BACKENDS)
def fresh_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to a database of each kind that no other test uses, with no tables yet."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    make: Callable[[], str] = request.getfixturevalue("pg_schemas")
    return make()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
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
        config = {"db_url": db_url, "limits_scope": limits_scope, "migrate": False, **config}
        platform = Platform(PlatformConfig(**config))
        opened.append(platform)
        return platform

    yield make
    for platform in opened:
        platform.close()


@pytest.fixture
def platform(make_platform: Callable[..., Platform]) -> Platform:
    return make_platform()
