"""The platform's tables as SQLAlchemy 2 models: the only place SQLAlchemy models exist.

| table        | one row is                     | invariant                                      |
|--------------|--------------------------------|------------------------------------------------|
| accounts     | a tenant and its money         | balance_micros >= 0, held_micros >= 0          |
| api_keys     | a key, stored as sha256 only   | key_hash unique; revoked_at set = refused      |
| prices       | a model's price per 1M tokens  | integer micro-dollars                          |
| credit_grants| one `loom credits add`         | amount_micros > 0                              |
| holds        | the worst case of one request  | state held -> settled or released, once        |
| usage        | one finished request           | id unique (the hold's server id): one per hold |

Money moves between `balance_micros` (spendable) and `held_micros` (promised to running
requests) only under the account row lock (`store.locked_account`). Changing a table means a
new Alembic revision in `migrations/versions/`; a test checks the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAME_LEN = 128
MODEL_LEN = 256
CLIENT_TEXT_LEN = 256  # client-sent request_id / user, cut to this before writing


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases (SQLite keeps no zone: store naive UTC, read back aware)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    __table_args__ = (
        CheckConstraint("balance_micros >= 0", name="ck_accounts_balance_nonnegative"),
        CheckConstraint("held_micros >= 0", name="ck_accounts_held_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    balance_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    held_micros: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(NAME_LEN))
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(BigInteger)
    models: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ModelPrice(Base):
    __tablename__ = "prices"

    model: Mapped[str] = mapped_column(String(MODEL_LEN), primary_key=True)
    input_micros: Mapped[int] = mapped_column(BigInteger)
    cached_input_micros: Mapped[int] = mapped_column(BigInteger)
    output_micros: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CreditGrant(Base):
    __tablename__ = "credit_grants"
    __table_args__ = (CheckConstraint("amount_micros > 0", name="ck_credit_grants_positive"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Hold(Base):
    """The worst case of one request, with the prices it was computed at (settled at the same)."""

    __tablename__ = "holds"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # server-generated, never the client's
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    amount_micros: Mapped[int] = mapped_column(BigInteger)
    input_micros: Mapped[int] = mapped_column(BigInteger)
    cached_input_micros: Mapped[int] = mapped_column(BigInteger)
    output_micros: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="held")  # held | settled | released
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Usage(Base):
    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_account_created", "account_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # the hold's id: one row per request
    request_id: Mapped[str | None] = mapped_column(String(CLIENT_TEXT_LEN))
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(MODEL_LEN))
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    cached_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cost_micros: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32))
    latency_ms: Mapped[int] = mapped_column(BigInteger)
    end_user: Mapped[str | None] = mapped_column(String(CLIENT_TEXT_LEN))  # the request's `user`
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
