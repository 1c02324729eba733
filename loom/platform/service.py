"""`Platform`: the one object the API holds: identity, limits, admission and money together.

Owns the order of the checks and what each refusal undoes: auth (`Refused`) -> requests per
minute (`RateLimited`) -> overload (`Overloaded`) -> tokens per minute (`RateLimited`) -> hold
(`Insufficient`); a refusal after the token count hands the tokens back and writes a `rejected`
usage row. `finish` settles or releases the hold and corrects the token count. Every method
blocks on the database (or Redis): the API calls them off the event loop. Token counts in,
decisions out: never imports the engine, serving or HTTP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from loom.platform import ledger, usage
from loom.platform.identity import Authenticator, Credential, JwtVerifier
from loom.platform.limits import RateLimiter
from loom.platform.store import Database, describe
from loom.platform.types import (
    Ending,
    Estimate,
    FinalUsage,
    Held,
    Insufficient,
    Overloaded,
    Principal,
    RateLimited,
    Refused,
    RequestMeta,
    Settlement,
    UsageRecord,
    WindowState,
)

log = logging.getLogger(__name__)
OVERLOAD_RETRY_AFTER_S = 2


@dataclass(frozen=True, slots=True)
class PlatformConfig:
    db_url: str | None = None  # None: LOOM_DB, else the default SQLite file
    redis_url: str | None = None  # None: rate-limit counters in this process
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    max_queued_requests: int | None = None  # None: never 503 for load
    migrate: bool = True  # apply Alembic migrations when opening
    limits_scope: str = "loom"
    stale_hold_age: timedelta = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request past every check, holding `hold.amount_micros`; `tokens` were counted for TPM."""

    hold: Held
    tokens: int
    tokens_window: WindowState | None


class Platform:
    def __init__(self, config: PlatformConfig) -> None:
        self.config = config
        verifier = None
        if config.jwt_secret is not None or config.jwt_public_key_file is not None:
            verifier = JwtVerifier(secret=config.jwt_secret, public_key_file=config.jwt_public_key_file)
        self.limiter = RateLimiter(config.redis_url, scope=config.limits_scope)
        if config.redis_url is not None and not self.limiter.check():
            raise ConnectionError(f"cannot reach Redis at {config.redis_url}")
        self.db = Database(config.db_url)
        if config.migrate:
            self.db.upgrade()
            released = ledger.release_stale_holds(self.db, config.stale_hold_age)
            if released:
                log.warning(
                    "released %d holds left open longer than %s (a server stopped mid-request)",
                    released,
                    config.stale_hold_age,
                )
        self.auth = Authenticator(self.db, verifier)

    def describe(self) -> str:
        """For the start-up line: where the data lives, and whether callers must authenticate."""
        mode = "open (no API keys yet)" if self.auth.is_open() else "API keys required"
        if self.auth.verifier is not None:
            mode = f"API keys or {self.auth.verifier.algorithm} JWT required"
        limits = "Redis" if self.limiter.shared else "in-process"
        return f"platform: {describe(self.db.url)}, {mode}, rate limits {limits}"

    def authenticate(self, credential: Credential | Refused | None) -> Principal | Refused | None:
        return self.auth.authenticate(credential)

    def limit_requests(self, who: Principal) -> tuple[WindowState | RateLimited | None, WindowState | None]:
        """Counts one request against the key's RPM; also reads its TPM window (for the headers)."""
        if who.key_id is None:
            return None, None
        requests = self.limiter.hit("requests", who.key_id, who.rpm, 1) if who.rpm is not None else None
        tokens = self.limiter.state("tokens", who.key_id, who.tpm) if who.tpm is not None else None
        return requests, tokens

    def overloaded(self, num_waiting: int) -> Overloaded | None:
        cap = self.config.max_queued_requests
        if cap is None or num_waiting < cap:
            return None
        return Overloaded(num_waiting, OVERLOAD_RETRY_AFTER_S)

    def admit(
        self, who: Principal, estimate: Estimate, hold_id: str, meta: RequestMeta
    ) -> Admitted | RateLimited | Insufficient:
        """Counts the worst case's tokens, then holds its cost; on refusal nothing stays counted."""
        tokens = estimate.max_total_tokens
        window: WindowState | None = None
        if who.tpm is not None and who.key_id is not None:
            counted = self.limiter.hit("tokens", who.key_id, who.tpm, tokens)
            if isinstance(counted, RateLimited):
                ledger.record_rejected(self.db, who, estimate.model, meta, 0)
                return counted
            window = counted
        try:
            decision = ledger.hold(self.db, hold_id, who, estimate)
        except Exception:
            self._refund_tokens(who, tokens if window is not None else 0)
            raise
        if isinstance(decision, Insufficient):
            self._refund_tokens(who, tokens)
            ledger.record_rejected(self.db, who, estimate.model, meta, 0)
            return decision
        return Admitted(decision, tokens if window is not None else 0, window)

    def finish(
        self, who: Principal, admitted: Admitted, used: FinalUsage, ending: Ending, meta: RequestMeta, latency_ms: int
    ) -> Settlement:
        """Settles (ok, client_disconnected) or releases (error, rejected) the hold; corrects TPM."""
        settlement = ledger.close(self.db, admitted.hold.hold_id, who.account_id, used, ending, meta, latency_ms)
        counted = used.total_tokens if ending.billed else 0
        self._refund_tokens(who, admitted.tokens - counted if admitted.tokens else 0)
        return settlement

    def usage_records(
        self, who: Principal, *, limit: int, since: datetime | None = None, before: str | None = None
    ) -> list[UsageRecord]:
        return usage.records(self.db, who.account_id, limit=limit, since=since, before=before)

    def close(self) -> None:
        self.db.dispose()

    def _refund_tokens(self, who: Principal, amount: int) -> None:
        if amount > 0 and who.tpm is not None and who.key_id is not None:
            self.limiter.refund("tokens", who.key_id, who.tpm, amount)
