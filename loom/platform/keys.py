"""API keys: minting, hashing, lookup, listing and revocation.

A key is `sk-loom-` plus 32 random bytes (URL-safe base64). Only its sha256 is stored, beside a
short visible prefix for listing and revoking. Lookup hashes what the client sent and finds the
row by that hash, then compares the hashes with `hmac.compare_digest`: the time taken says
nothing about how close a guess was. Never stores, logs or returns a key after `create_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from loom.platform.db import Account, ApiKey, utcnow
from loom.platform.store import Database

KEY_PREFIX = "sk-loom-"
VISIBLE_CHARS = 8  # random characters kept in the visible prefix
MAX_KEY_LEN = 256  # a longer credential is refused before it is hashed
MAX_MODELS = 256
_FIND_KEY = (
    select(
        ApiKey.id,
        ApiKey.prefix,
        ApiKey.key_hash,
        ApiKey.account_id,
        Account.name.label("account_name"),
        ApiKey.rpm,
        ApiKey.tpm,
        ApiKey.models,
        ApiKey.revoked_at,
    )
    .join(Account, ApiKey.account_id == Account.id)
    .where(ApiKey.key_hash == bindparam("digest"))
)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key as `loom keys list` shows it: everything but the secret."""

    id: int
    prefix: str
    account: str
    name: str | None
    rpm: int | None
    tpm: int | None
    models: tuple[str, ...] | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyRow:
    """What authentication needs from a key row."""

    id: int
    prefix: str
    account_id: int
    account_name: str
    rpm: int | None
    tpm: int | None
    models: frozenset[str] | None
    revoked: bool


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def ensure_account(session: Session, name: str) -> Account:
    """The account called `name`, created with a zero balance if it does not exist."""
    if not name or len(name) > 128 or not name.isprintable():
        raise ValueError("an account name is 1 to 128 printable characters")
    account = session.execute(select(Account).where(Account.name == name)).scalar_one_or_none()
    if account is None:
        account = Account(name=name, balance_micros=0, held_micros=0)
        session.add(account)
        session.flush()
    return account


def create_key(
    db: Database,
    account: str,
    *,
    name: str | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    models: Iterable[str] | None = None,
) -> tuple[str, KeyInfo]:
    """Mints a key for `account` (created if needed). Returns the key itself: the only time it exists."""
    model_list = _clean_models(models)
    for label, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and value <= 0:
            raise ValueError(f"--{label} must be a positive integer")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.write() as session:
        owner = ensure_account(session, account)
        row = ApiKey(
            account_id=owner.id,
            name=name,
            prefix=key[: len(KEY_PREFIX) + VISIBLE_CHARS],
            key_hash=hash_key(key),
            rpm=rpm,
            tpm=tpm,
            models=model_list,
        )
        session.add(row)
        session.flush()
        return key, _info(row, owner.name)


def list_keys(db: Database, account: str | None = None) -> list[KeyInfo]:
    with db.read() as session:
        query = select(ApiKey, Account.name).join(Account, ApiKey.account_id == Account.id).order_by(ApiKey.id)
        if account is not None:
            query = query.where(Account.name == account)
        return [_info(row, owner) for row, owner in session.execute(query)]


def revoke_key(db: Database, key_or_prefix: str) -> KeyInfo:
    """Revokes the key given whole, or by its visible prefix when that names exactly one key."""
    with db.write() as session:
        if key_or_prefix.startswith(KEY_PREFIX) and len(key_or_prefix) > len(KEY_PREFIX) + VISIBLE_CHARS:
            rows = list(session.execute(select(ApiKey).where(ApiKey.key_hash == hash_key(key_or_prefix))).scalars())
        else:
            rows = list(session.execute(select(ApiKey).where(ApiKey.prefix == key_or_prefix)).scalars())
        if not rows:
            raise LookupError("no key matches")
        if len(rows) > 1:
            raise LookupError(f"{len(rows)} keys share that prefix; revoke by the whole key")
        row = rows[0]
        if row.revoked_at is None:
            row.revoked_at = utcnow()
        owner = session.get_one(Account, row.account_id)
        return _info(row, owner.name)


def any_key(db: Database) -> bool:
    """Whether a key was ever created: revoked ones count, so revoking the last key never opens the server."""
    with db.read() as session:
        return session.execute(select(ApiKey.id).limit(1)).first() is not None


def find_key(db: Database, key: str) -> KeyRow | None:
    """The key row whose hash matches `key`, revoked or not; None if there is none."""
    if not key or len(key) > MAX_KEY_LEN:
        return None
    digest = hash_key(key)
    with db.lookup() as conn:
        row = conn.execute(_FIND_KEY, {"digest": digest}).first()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return KeyRow(
        id=row.id,
        prefix=row.prefix,
        account_id=row.account_id,
        account_name=row.account_name,
        rpm=row.rpm,
        tpm=row.tpm,
        models=frozenset(row.models) if row.models is not None else None,
        revoked=row.revoked_at is not None,
    )


def _clean_models(models: Iterable[str] | None) -> list[str] | None:
    if models is None:
        return None
    cleaned = sorted({m.strip() for m in models if m.strip()})
    if not cleaned:
        raise ValueError("--models needs at least one model name")
    if len(cleaned) > MAX_MODELS or any(len(m) > 256 for m in cleaned):
        raise ValueError(f"--models takes at most {MAX_MODELS} names of at most 256 characters")
    return cleaned


def _info(row: ApiKey, account: str) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        prefix=row.prefix,
        account=account,
        name=row.name,
        rpm=row.rpm,
        tpm=row.tpm,
        models=tuple(row.models) if row.models is not None else None,
        created_at=row.created_at,
        revoked_at=row.revoked_at,
    )
