"""Alembic's entry point: runs the migrations on the connection `Database.upgrade` hands over.

Online only (there is no SQL-script mode). On PostgreSQL a transaction-scoped advisory lock makes
servers that start together migrate one after another; on SQLite the migration transaction
begins IMMEDIATE (see `store.py`), which does the same.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from loom.platform.db import Base

_MIGRATION_LOCK_ID = 0x6C6F6F6D  # "loom": any constant every Loom process agrees on

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
    context.run_migrations()
