"""Reading the usage ledger: one caller's own records, and the operator's summary.

Never writes (rows are written by `ledger` in the same transaction that moves the money).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, or_, select

from loom.platform.db import Account, ApiKey, Usage
from loom.platform.store import Database
from loom.platform.types import Ending, UsageRecord

MAX_PAGE = 1000


@dataclass(frozen=True, slots=True)
class UsageSummary:
    """One line of `loom usage`: an account, a key (None: JWT callers) and a model."""

    account: str
    key_prefix: str | None
    model: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int


def records(
    db: Database, account_id: int, *, limit: int = 100, since: datetime | None = None, before: str | None = None
) -> list[UsageRecord]:
    """The account's records, newest first; `before` is the id of the last record of the previous page."""
    limit = max(1, min(limit, MAX_PAGE + 1))  # one more than a page: the caller can tell a next page exists
    with db.read() as session:
        query = select(Usage).where(Usage.account_id == account_id)
        if since is not None:
            query = query.where(Usage.created_at >= since)
        if before is not None:
            cursor = session.execute(
                select(Usage.created_at).where(Usage.id == before, Usage.account_id == account_id)
            ).scalar_one_or_none()
            if cursor is None:
                return []
            query = query.where(or_(Usage.created_at < cursor, and_(Usage.created_at == cursor, Usage.id < before)))
        query = query.order_by(Usage.created_at.desc(), Usage.id.desc()).limit(limit)
        return [_record(row) for row in session.execute(query).scalars()]


def summary(db: Database, *, account: str | None = None, since: datetime | None = None) -> list[UsageSummary]:
    with db.read() as session:
        query = (
            select(
                Account.name,
                ApiKey.prefix,
                Usage.model,
                func.count(Usage.id),
                func.coalesce(func.sum(Usage.prompt_tokens), 0),
                func.coalesce(func.sum(Usage.cached_tokens), 0),
                func.coalesce(func.sum(Usage.completion_tokens), 0),
                func.coalesce(func.sum(Usage.cost_micros), 0),
            )
            .join(Account, Usage.account_id == Account.id)
            .outerjoin(ApiKey, Usage.key_id == ApiKey.id)
            .group_by(Account.name, ApiKey.prefix, Usage.model)
            .order_by(Account.name, ApiKey.prefix, Usage.model)
        )
        if account is not None:
            query = query.where(Account.name == account)
        if since is not None:
            query = query.where(Usage.created_at >= since)
        return [UsageSummary(*(row[:3]), *(int(v) for v in row[3:])) for row in session.execute(query)]


def spent(db: Database, account_id: int) -> int:
    with db.read() as session:
        total = session.execute(
            select(func.coalesce(func.sum(Usage.cost_micros), 0)).where(Usage.account_id == account_id)
        ).scalar_one()
    return int(total)


def _record(row: Usage) -> UsageRecord:
    return UsageRecord(
        id=row.id,
        request_id=row.request_id,
        account_id=row.account_id,
        key_id=row.key_id,
        model=row.model,
        prompt_tokens=row.prompt_tokens,
        cached_tokens=row.cached_tokens,
        completion_tokens=row.completion_tokens,
        cost_micros=row.cost_micros,
        status=Ending(row.status),
        latency_ms=row.latency_ms,
        user=row.end_user,
        created_at=row.created_at,
    )
