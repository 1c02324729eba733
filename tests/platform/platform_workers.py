"""Work run in other processes by the platform tests (importable by name, as `spawn` needs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from loom.platform import ledger
from loom.platform.limits import RateLimiter
from loom.platform.store import Database
from loom.platform.types import Estimate, Held, Principal


def place_holds(url: str, account_id: int, hold_ids: list[str], estimate: Estimate) -> list[str]:
    """Places each hold from its own thread; returns the ids that were granted."""
    db = Database(url)
    who = Principal(account_id=account_id, account_name="race")
    try:
        with ThreadPoolExecutor(max_workers=len(hold_ids)) as pool:
            results = list(pool.map(lambda hold_id: ledger.hold(db, hold_id, who, estimate), hold_ids))
    finally:
        db.dispose()
    return [r.hold_id for r in results if isinstance(r, Held)]


def hit_requests(redis_url: str, scope: str, key_id: int, rpm: int, num_hits: int) -> int:
    """Fires `num_hits` one-request hits at one key's RPM window; returns how many were allowed."""
    limiter = RateLimiter(redis_url, scope=scope)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: limiter.hit("requests", key_id, rpm, 1), range(num_hits)))
    return sum(1 for r in results if not hasattr(r, "retry_after_s"))
