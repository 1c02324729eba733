"""Per-key rate limits: requests per minute and tokens per minute.

Counting is the `limits` library's sliding-window counter (an atomic check-and-add: a refused
hit adds nothing), in this process's memory by default or in Redis with a URL, where every server
process on that Redis shares one count exactly (Redis runs each check-and-add as one Lua script).
Tokens are counted at admission for the worst case and corrected when the request ends by
handing back what it did not use. This module also reads each window's state for the
`x-ratelimit-*` headers and computes when a refused hit would fit (`retry-after`).
Never authenticates and never decides the price of anything.
"""

from __future__ import annotations

import math

from limits import RateLimitItemPerMinute
from limits.storage import Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

from loom.platform.types import RateLimited, WindowState

WINDOW_S = 60


class RateLimiter:
    """RPM and TPM windows per key id. `scope` namespaces the counters (several servers, tests)."""

    def __init__(self, redis_url: str | None = None, *, scope: str = "loom") -> None:
        storage = storage_from_string(redis_url or "memory://")
        if not isinstance(storage, Storage):  # an `async+...` URL: this limiter runs on worker threads
            raise ValueError(f"{redis_url}: use a redis:// URL")
        self.storage = storage
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self.scope = scope
        self.shared = redis_url is not None

    def check(self) -> bool:
        """Whether the storage answers (start-up check for Redis)."""
        return bool(self.storage.check())

    def hit(self, kind: str, key_id: int, limit: int, cost: int) -> WindowState | RateLimited:
        """Takes `cost` from the key's `kind` ("requests" / "tokens") window if it fits whole."""
        item, ids = self._item(kind, limit), (self.scope, kind, str(key_id))
        if cost > limit:
            return RateLimited(kind, self._state(item, ids), retry_after_s=WINDOW_S, too_large=True)
        if self.strategy.hit(item, *ids, cost=cost):
            return self._state(item, ids)
        window = self.storage.get_sliding_window(item.key_for(*ids), WINDOW_S)  # type: ignore[attr-defined]
        wait = seconds_until_room(*window, limit=limit, cost=cost)
        return RateLimited(kind, self._state(item, ids), retry_after_s=math.floor(wait) + 1)  # strictly after

    def refund(self, kind: str, key_id: int, limit: int, amount: int) -> None:
        """Hands back `amount` counted earlier (at most what the current window still holds)."""
        if amount <= 0:
            return
        item, ids = self._item(kind, limit), (self.scope, kind, str(key_id))
        _, _, current, _ = self.storage.get_sliding_window(item.key_for(*ids), WINDOW_S)  # type: ignore[attr-defined]
        # what was counted in a window that has since rolled over is already fading; hand back
        # only what the current window holds, so a count never goes below zero
        amount = min(amount, current)
        if amount > 0:
            self.strategy.hit(item, *ids, cost=-amount)

    def state(self, kind: str, key_id: int, limit: int) -> WindowState:
        return self._state(self._item(kind, limit), (self.scope, kind, str(key_id)))

    def _item(self, kind: str, limit: int) -> RateLimitItemPerMinute:
        return RateLimitItemPerMinute(limit, namespace=f"loom-{kind}")

    def _state(self, item: RateLimitItemPerMinute, ids: tuple[str, ...]) -> WindowState:
        prev, prev_ttl, current, current_ttl = self.storage.get_sliding_window(item.key_for(*ids), WINDOW_S)  # type: ignore[attr-defined]
        used = math.floor(prev * prev_ttl / WINDOW_S) + current
        # back to its initial state once both windows' counts have faded out
        if current > 0:
            reset = max(0.0, current_ttl - WINDOW_S) + WINDOW_S
        else:
            reset = prev_ttl if prev > 0 else 0.0
        return WindowState(limit=item.amount, remaining=max(0, item.amount - used), reset_s=reset)


def seconds_until_room(prev: int, prev_ttl: float, current: int, current_ttl: float, *, limit: int, cost: int) -> float:
    """After how long the sliding-window count leaves room for `cost` (any moment after it will do).

    The library admits when `floor(prev * prev_ttl / W) + current + cost <= limit`, that is when
    `prev * prev_ttl / W < limit - current - cost + 1`. The previous window's weight fades
    linearly while the current one runs; when the current one ends (`current_ttl - W` from now)
    its count becomes the fading previous one and the new current starts at zero.
    """
    current_ends = max(0.0, current_ttl - WINDOW_S)
    room = limit - current - cost + 1
    if room > 0:
        wait = 0.0 if prev == 0 else max(0.0, prev_ttl - room * WINDOW_S / prev)
        if wait <= current_ends:
            return wait
    room_after = limit - cost + 1
    after = 0.0 if current == 0 else max(0.0, WINDOW_S - room_after * WINDOW_S / current)
    return current_ends + after
