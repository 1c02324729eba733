"""Alembic migrations of the platform's tables (applied by `Database.upgrade`, `loom db upgrade`)."""
