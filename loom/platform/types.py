"""The platform's plain types: who is calling, what a request may cost, and every decision taken.

Frozen, slotted dataclasses only: these cross from `loom.platform` to the API layer, which maps
each decision to its HTTP answer (`Refused` -> 401/400, `RateLimited` -> 429, `Insufficient` ->
402, `Overloaded` -> 503). Nothing here knows HTTP, SQL or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Ending(StrEnum):
    """How a request ended, as the usage ledger records it. Only OK and CLIENT_DISCONNECTED are billed."""

    OK = "ok"
    CLIENT_DISCONNECTED = "client_disconnected"
    ERROR = "error"
    REJECTED = "rejected"

    @property
    def billed(self) -> bool:
        return self in (Ending.OK, Ending.CLIENT_DISCONNECTED)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. `key_id` is None for a JWT caller; limits None means unlimited."""

    account_id: int
    account_name: str
    key_id: int | None = None
    key_prefix: str | None = None
    rpm: int | None = None
    tpm: int | None = None
    models: frozenset[str] | None = None  # None: every model

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models

    def cache_salt(self, request_salt: str | None = None) -> str:
        """The prefix-cache salt of this caller's requests: the account's, plus the request's own
        `cache_salt`, so no tenant can time another's cached prompts."""
        own = f"account:{self.account_id}"
        return own if request_salt is None else f"{own}:{request_salt}"


@dataclass(frozen=True, slots=True)
class Refused:
    """Authentication failed. `ambiguous` means two different credentials were sent (400, not 401).

    `message` is safe to show the client: it never contains the credential.
    """

    message: str
    ambiguous: bool = False


@dataclass(frozen=True, slots=True)
class Estimate:
    """What admission knows before generation: the worst case of one request."""

    model: str
    prompt_tokens: int
    max_new_tokens: int  # per sequence: max_tokens, or the context's room
    num_sequences: int = 1  # max(n, best_of), or the beam width

    @property
    def max_completion_tokens(self) -> int:
        return self.max_new_tokens * self.num_sequences

    @property
    def max_total_tokens(self) -> int:
        return self.prompt_tokens + self.max_completion_tokens


@dataclass(frozen=True, slots=True)
class FinalUsage:
    """What a request actually used; the same numbers the client sees in `usage`."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """What the ledger keeps about a request besides its tokens (client values, bounded on write)."""

    request_id: str | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Held:
    hold_id: str
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Insufficient:
    """The balance cannot cover the worst case. Numbers are the caller's own account's."""

    balance_micros: int
    needed_micros: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """A closed hold. `cost_micros` is what was debited; the rest of the hold went back."""

    hold_id: str
    cost_micros: int
    ending: Ending


@dataclass(frozen=True, slots=True)
class WindowState:
    """One limit's window after a decision: for the `x-ratelimit-*` headers."""

    limit: int
    remaining: int
    reset_s: float  # seconds until the window has room again


@dataclass(frozen=True, slots=True)
class RateLimited:
    """429: `retry_after_s` is when the refused amount could fit; `too_large` if it never can."""

    kind: str  # "requests" or "tokens"
    window: WindowState
    retry_after_s: int
    too_large: bool = False


@dataclass(frozen=True, slots=True)
class Overloaded:
    num_waiting: int
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One row of the usage ledger."""

    id: str
    request_id: str | None
    account_id: int
    key_id: int | None
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_micros: int
    status: Ending
    latency_ms: int
    user: str | None
    created_at: datetime
