"""Balances: credit, holds, settlement, and the usage rows they write.

Every change of an account's money is one transaction under `Database.lock_account`, so the
balance check and the debit can never be split by another request, another thread or another
server process on the same database:

    hold    balance -= worst case, held += worst case     (refused: `Insufficient`, nothing written)
    settle  held -= hold, balance += hold - cost           (+ one usage row, status ok / client_disconnected)
    release held -= hold, balance += hold                  (+ one usage row, status error / rejected)

Holds are keyed by a server-generated id (`new_hold_id`), never the client's `request_id`.
Each verb is idempotent: placing a hold id twice debits once; closing a closed hold returns the
first settlement. A settlement never costs more than its hold (prices are fixed at hold time).
Never decides who the caller is or whether a rate limit allows the request.
"""

from __future__ import annotations

import logging
import secrets
from datetime import datetime, timedelta

from sqlalchemy import BigInteger, Connection, bindparam, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from loom.platform.db import CLIENT_TEXT_LEN, MODEL_LEN, Account, CreditGrant, Hold, ModelPrice, Usage, utcnow
from loom.platform.keys import ensure_account
from loom.platform.money import FREE, Price, token_cost, worst_case_cost
from loom.platform.store import Database
from loom.platform.types import Ending, Estimate, FinalUsage, Held, Insufficient, Principal, RequestMeta, Settlement

log = logging.getLogger(__name__)


def new_hold_id() -> str:
    return secrets.token_hex(16)


_PRICE = select(ModelPrice.input_micros, ModelPrice.cached_input_micros, ModelPrice.output_micros).where(
    ModelPrice.model == bindparam("model")
)
_HOLD = select(
    Hold.account_id,
    Hold.key_id,
    Hold.model,
    Hold.amount_micros,
    Hold.state,
    Hold.input_micros,
    Hold.cached_input_micros,
    Hold.output_micros,
).where(Hold.id == bindparam("id"))
_SETTLED = select(Usage.cost_micros, Usage.status).where(Usage.id == bindparam("id"))
_MOVE = (
    update(Account)
    .where(Account.id == bindparam("account"))
    .values(
        balance_micros=Account.balance_micros + bindparam("to_balance", type_=BigInteger),
        held_micros=Account.held_micros + bindparam("to_held", type_=BigInteger),
    )
)
_CLOSE_HOLD = (
    update(Hold).where(Hold.id == bindparam("hold")).values(state=bindparam("new_state"), closed_at=bindparam("at"))
)
_NEW_USAGE = insert(Usage)
# a hold id placed twice is skipped: RETURNING gives a row only when this one was inserted
_NEW_HOLD_SQLITE = sqlite_insert(Hold).on_conflict_do_nothing().returning(Hold.id)
_NEW_HOLD_POSTGRESQL = postgresql_insert(Hold).on_conflict_do_nothing().returning(Hold.id)


def hold(db: Database, hold_id: str, who: Principal, estimate: Estimate) -> Held | Insufficient:
    """Reserves the worst case of `estimate` on `who`'s balance under `hold_id`."""
    # not durable: a hold lost in a crash goes with its request, as release_stale_holds would undo it
    with db.money_transaction(durable=False) as conn:
        price = _price(conn, estimate.model)  # before the lock, which other requests queue on
        amount = worst_case_cost(price, estimate.prompt_tokens, estimate.max_completion_tokens)
        account = db.lock_account(conn, who.account_id)
        if account is None:
            return Insufficient(balance_micros=0, needed_micros=amount)
        if account.balance_micros >= amount:
            # the hold row first, skipped if this id exists: a repeated hold debits once
            placed = conn.execute(
                _NEW_HOLD_SQLITE if db.is_sqlite else _NEW_HOLD_POSTGRESQL,
                {
                    "id": hold_id,
                    "account_id": who.account_id,
                    "key_id": who.key_id,
                    "model": client_text(estimate.model) or "",
                    "amount_micros": amount,
                    "input_micros": price.input_micros,
                    "cached_input_micros": price.cached_input_micros,
                    "output_micros": price.output_micros,
                    "state": "held",
                },
            )
            if placed.first() is not None:
                conn.execute(_MOVE, {"account": who.account_id, "to_balance": -amount, "to_held": amount})
                return Held(hold_id, amount)
        existing = conn.execute(_HOLD, {"id": hold_id}).first()
        if existing is not None:
            return Held(hold_id, existing.amount_micros)
        return Insufficient(balance_micros=account.balance_micros, needed_micros=amount)


def close(
    db: Database, hold_id: str, account_id: int, used: FinalUsage, ending: Ending, meta: RequestMeta, latency_ms: int
) -> Settlement:
    """Settles (billed endings) or releases (the others) `hold_id`, writing its usage row. Idempotent."""
    with db.account_lock(account_id) as (conn, account):
        held = conn.execute(_HOLD, {"id": hold_id}).first()
        if held is None or account is None or held.account_id != account_id:
            raise LookupError("no such hold on this account")
        if held.state != "held":
            settled = conn.execute(_SETTLED, {"id": hold_id}).one()
            return Settlement(hold_id, settled.cost_micros, Ending(settled.status))
        price = Price(held.input_micros, held.cached_input_micros, held.output_micros)
        cost = _cost(hold_id, held.amount_micros, price, used) if ending.billed else 0
        moved = {"account": account_id, "to_balance": held.amount_micros - cost, "to_held": -held.amount_micros}
        conn.execute(_MOVE, moved)
        state = "settled" if ending.billed else "released"
        conn.execute(_CLOSE_HOLD, {"hold": hold_id, "new_state": state, "at": utcnow()})
        row = _usage_row(hold_id, account_id, held.key_id, held.model, used, cost, ending, meta, latency_ms)
        conn.execute(_NEW_USAGE, row)
    return Settlement(hold_id, cost, ending)


def record_rejected(db: Database, who: Principal, model: str, meta: RequestMeta, latency_ms: int) -> str:
    """A usage row for a request refused before any hold (402, or 429 on tokens): it cost nothing."""
    row_id = new_hold_id()
    row = _usage_row(row_id, who.account_id, who.key_id, model, FinalUsage(), 0, Ending.REJECTED, meta, latency_ms)
    with db.write() as session:
        session.execute(_NEW_USAGE, row)
    return row_id


def release_stale_holds(db: Database, older_than: timedelta) -> int:
    """Releases holds a crashed server left open (a server-side failure costs nothing)."""
    cutoff = utcnow() - older_than
    with db.read() as session:
        stale = list(
            session.execute(select(Hold.id, Hold.account_id).where(Hold.state == "held", Hold.created_at < cutoff))
        )
    released = 0
    for hold_id, account_id in stale:
        try:
            close(db, hold_id, account_id, FinalUsage(), Ending.ERROR, RequestMeta(), 0)
            released += 1
        except Exception as exc:  # one row that breaks an invariant must not keep the server down
            log.error("cannot release stale hold %s (left as it is): %s", hold_id, type(exc).__name__)
    return released


def add_credit(db: Database, account_name: str, amount_micros: int) -> Account:
    if amount_micros <= 0:
        raise ValueError("the amount must be positive")
    with db.write() as session:
        account_id = ensure_account(session, account_name).id
    with db.account_lock(account_id) as (conn, account):
        if account is None:  # created just above, and accounts are never deleted
            raise LookupError(f"account {account_name!r} vanished")
        conn.execute(_MOVE, {"account": account_id, "to_balance": amount_micros, "to_held": 0})
        conn.execute(insert(CreditGrant), {"account_id": account_id, "amount_micros": amount_micros})
    with db.read() as session:
        return session.get_one(Account, account_id)


def find_account(db: Database, name: str) -> Account | None:
    with db.read() as session:
        return session.execute(select(Account).where(Account.name == name)).scalar_one_or_none()


def set_price(db: Database, model: str, price: Price) -> None:
    if not model or len(model) > MODEL_LEN:
        raise ValueError(f"a model name is 1 to {MODEL_LEN} characters")
    with db.write() as session:
        row = session.get(ModelPrice, model)
        if row is None:
            row = ModelPrice(model=model)
            session.add(row)
        row.input_micros = price.input_micros
        row.cached_input_micros = price.cached_input_micros
        row.output_micros = price.output_micros
        row.updated_at = utcnow()


def list_prices(db: Database) -> list[tuple[str, Price, datetime]]:
    with db.read() as session:
        rows = session.execute(select(ModelPrice).order_by(ModelPrice.model)).scalars()
        return [(r.model, Price(r.input_micros, r.cached_input_micros, r.output_micros), r.updated_at) for r in rows]


def _price(conn: Connection, model: str) -> Price:
    row = conn.execute(_PRICE, {"model": model[:MODEL_LEN]}).first()
    return FREE if row is None else Price(row.input_micros, row.cached_input_micros, row.output_micros)


def _cost(hold_id: str, held_micros: int, price: Price, used: FinalUsage) -> int:
    cost = token_cost(price, used.prompt_tokens, used.cached_tokens, used.completion_tokens)
    if cost > held_micros:
        # the estimate was not the worst case after all: the caller's balance stays whole, the
        # provider absorbs the difference, and the operator hears about it
        log.warning("hold %s: usage cost %d exceeds the hold %d; charging the hold", hold_id, cost, held_micros)
        return held_micros
    return cost


def client_text(value: str | None) -> str | None:
    """Client-sent text as every database stores it: bounded, valid UTF-8, no NUL."""
    if value is None:
        return None
    cut = value[:CLIENT_TEXT_LEN].encode("utf-8", "replace").decode("utf-8")
    return cut.replace("\x00", "\ufffd")


def _usage_row(
    row_id: str,
    account_id: int,
    key_id: int | None,
    model: str,
    used: FinalUsage,
    cost: int,
    ending: Ending,
    meta: RequestMeta,
    latency_ms: int,
) -> dict[str, object]:
    return {
        "id": row_id,
        "request_id": client_text(meta.request_id),
        "account_id": account_id,
        "key_id": key_id,
        "model": client_text(model) or "",
        "prompt_tokens": used.prompt_tokens,
        "cached_tokens": used.cached_tokens,
        "completion_tokens": used.completion_tokens,
        "cost_micros": cost,
        "status": ending.value,
        "latency_ms": max(0, latency_ms),
        "end_user": client_text(meta.user),
    }
