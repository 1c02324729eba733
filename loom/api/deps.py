"""FastAPI dependencies that put the platform in a route's signature: auth -> limits -> load -> hold.

    async def chat(body: ..., key: AuthedKey, _rate: RateLimits, _load: LoadAdmission, meter: HoldMeter)

Each dependency depends on the one before it, so the order holds however a route lists them:
`AuthedKey` (401, or 400 for two different credentials) -> `RateLimits` (429 on the key's requests
per minute; not `loom.api.limits.RequestLimits`, the sizes one request may carry) ->
`LoadAdmission` (503 while the engine's queue is full) -> `HoldMeter`, whose `admit(estimate,
meta)` the route calls once the prompt is counted (429 on tokens per minute, 402 on balance) and
whose `settle(usage, ending)` it calls when the request ends, however it ends.
A hold the route never settled is released free when the response is over (a server-side failure
costs nothing). A stream settles after its last byte went out (its client does not wait on the
account's row lock, which every request of that account queues on); `/v1/usage` waits for the
caller's settlements still running in this process, so a caller reads its row as soon as its
stream ended. `AuthedKey` is None while the server is open (no key, no JWT) or runs without a platform;
then every other dependency lets the request through.

Platform calls block on the database or Redis, so they run on worker threads; their failures
answer 503 without detail. Credentials never reach a log or an answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.api.errors import (
    AuthenticationError,
    BadRequestError,
    InsufficientBalanceError,
    RateLimitError,
    ServiceUnavailableError,
    model_not_found,
)
from loom.platform import (
    Admitted,
    Ending,
    Estimate,
    FinalUsage,
    Insufficient,
    Platform,
    Principal,
    RateLimited,
    Refused,
    RequestMeta,
    Settlement,
    WindowState,
    read_credential,
)
from loom.platform.ledger import new_hold_id

log = logging.getLogger(__name__)
T = TypeVar("T")
_HEADERS_KEY = "loom_ratelimit_headers"  # in the ASGI scope's state: what RateLimitHeadersMiddleware adds
_SETTLE_ATTEMPTS = 2  # settling is idempotent, so one retry after a transient database error is safe


@dataclass(frozen=True, slots=True)
class PlatformState:
    """What `install_platform` leaves on `app.state` for the dependencies."""

    platform: Platform | None
    num_waiting: Callable[[], int]  # the engine's waiting-queue length, for 503 admission
    settling: dict[asyncio.Task[Any], int] = field(default_factory=dict)  # streams' settlements running -> account

    async def settled(self, account_id: int) -> None:
        """Returns once the account's settlements running now have finished (however they
        finished); another tenant's slow settlement never delays this one's reads."""
        mine = [task for task, owner in self.settling.items() if owner == account_id]
        if mine:
            await asyncio.gather(*mine, return_exceptions=True)


def install_platform(app: FastAPI, platform: Platform | None, num_waiting: Callable[[], int]) -> None:
    """Makes the dependencies below work on `app` (call once in `create_app`)."""
    app.state.loom_platform = PlatformState(platform, num_waiting)
    app.add_middleware(RateLimitHeadersMiddleware)


_NO_PLATFORM = PlatformState(None, lambda: 0)


def platform_state(request: Request) -> PlatformState:
    state: PlatformState | None = getattr(request.app.state, "loom_platform", None)
    return state if state is not None else _NO_PLATFORM


async def run_blocking(func: Callable[..., T], *args: Any) -> T:
    """Runs a platform call on a worker thread; a database or Redis failure becomes a plain 503."""
    try:
        return await anyio.to_thread.run_sync(func, *args)
    except Exception as exc:
        # credentials never reach SQL (keys are looked up by hash) and SQL parameters are hidden
        log.error("platform call %s failed", getattr(func, "__name__", "?"), exc_info=exc)
        raise ServiceUnavailableError("The service is temporarily unavailable; retry shortly.") from None


# ---- auth -> limits -> load ------------------------------------------------------------------


async def authenticate(request: Request) -> Principal | None:
    platform = platform_state(request).platform
    if platform is None:
        return None
    headers = request.headers
    credential = read_credential(
        headers.getlist("authorization"), headers.getlist("x-api-key"), headers.getlist("token")
    )
    outcome = await run_blocking(platform.authenticate, credential)
    if isinstance(outcome, Refused):
        raise (
            BadRequestError(outcome.message, code="ambiguous_credentials")
            if outcome.ambiguous
            else AuthenticationError(outcome.message)
        )
    return outcome


AuthedKey = Annotated[Principal | None, Depends(authenticate)]


async def limit_requests(request: Request, key: AuthedKey) -> Principal | None:
    platform = platform_state(request).platform
    if platform is None or key is None:
        return key
    outcome, tokens = await run_blocking(platform.limit_requests, key)
    if isinstance(outcome, RateLimited):
        _remember(request, outcome.window, tokens)
        raise _rate_limited(outcome, request)
    _remember(request, outcome, tokens)
    return key


RateLimits = Annotated[Principal | None, Depends(limit_requests)]


async def admit_load(request: Request, key: RateLimits) -> Principal | None:
    state = platform_state(request)
    if state.platform is None:
        return key
    overloaded = state.platform.overloaded(state.num_waiting())
    if overloaded is not None:
        raise ServiceUnavailableError(
            "The server is overloaded; retry shortly.",
            code="server_overloaded",
            headers={"retry-after": str(overloaded.retry_after_s)},
        )
    return key


LoadAdmission = Annotated[Principal | None, Depends(admit_load)]


def check_model_allowed(key: Principal | None, model: str, aliases: Sequence[str] = ()) -> None:
    """404 for a model the key may not use, worded as for a model that does not exist.

    `aliases` are the other names the server answers to for the same model (`--served-model-name`):
    a key listing any of them may use it by any of them."""
    if key is not None and not any(key.allows(name) for name in (model, *aliases)):
        raise model_not_found(model)


# ---- the hold --------------------------------------------------------------------------------


class Meter:
    """One request's money: `admit` places the hold, `settle` closes it. Both are no-ops while the
    caller is anonymous (open server, or no platform)."""

    def __init__(self, request: Request, platform: Platform | None, key: Principal | None) -> None:
        self._request = request
        self._settling: asyncio.Task[Settlement | None] | None = None
        self._platform = platform if key is not None else None
        self._key = key
        self._started = time.monotonic()
        self._meta = RequestMeta()
        self._admitted: Admitted | None = None
        self._stream: AsyncGenerator[str, None] | None = None
        self.settlement: Settlement | None = None

    @property
    def hold_id(self) -> str | None:
        return self._admitted.hold.hold_id if self._admitted is not None else None

    async def admit(self, estimate: Estimate, meta: RequestMeta) -> None:
        """Counts the worst case against tokens per minute and holds its cost: 429 or 402 if not."""
        if self._platform is None or self._key is None or self._admitted is not None:
            return
        self._meta = meta
        outcome = await run_blocking(self._platform.admit, self._key, estimate, new_hold_id(), meta)
        if isinstance(outcome, RateLimited):
            _remember(self._request, None, outcome.window)
            raise _rate_limited(outcome, self._request)
        if isinstance(outcome, Insufficient):
            raise InsufficientBalanceError(
                "Your balance is too low for this request's worst case (prompt plus max_tokens for "
                "every choice); add credit or lower max_tokens."
            )
        self._admitted = outcome
        if outcome.tokens_window is not None:
            _remember(self._request, None, outcome.tokens_window)

    async def settle(self, used: FinalUsage, ending: Ending) -> Settlement | None:
        """Bills `used` (ok, client_disconnected) or releases the hold (error, rejected); writes the
        usage row. Call once per request with the usage the client was shown; later calls return
        the first settlement. Runs to the end even if the calling task is being cancelled."""
        if self._platform is None or self._key is None or self._admitted is None or self.settlement is not None:
            return self.settlement
        latency_ms = int((time.monotonic() - self._started) * 1000)
        args = (self._key, self._admitted, used, ending, self._meta, latency_ms)
        with anyio.CancelScope(shield=True):  # a client that left must still pay, and only once
            for attempt in range(_SETTLE_ATTEMPTS):
                try:
                    self.settlement = await anyio.to_thread.run_sync(self._platform.finish, *args)
                    break
                except Exception as exc:
                    log.error("settling hold %s failed (attempt %d): %s", self.hold_id, attempt + 1, type(exc).__name__)
        return self.settlement

    def stream(
        self,
        lines: AsyncGenerator[str, None],
        usage: Callable[[], FinalUsage],
        failed: Callable[[], bool] = lambda: False,
    ) -> AsyncGenerator[str, None]:
        """Wraps a streamed response's lines so the request settles when they end: `ok` once all
        were sent (`error` if `failed()` says the server failed), `client_disconnected` when the
        client left, billing what `usage()` says was produced by then (after `lines` is closed,
        so the engine has stopped). Use at most once per request."""
        self._stream = self._metered(lines, usage, failed)
        return self._stream

    async def _metered(
        self, lines: AsyncGenerator[str, None], usage: Callable[[], FinalUsage], failed: Callable[[], bool]
    ) -> AsyncGenerator[str, None]:
        ending = Ending.ERROR
        try:
            async for line in lines:
                yield line
            ending = Ending.ERROR if failed() else Ending.OK
        except (GeneratorExit, anyio.get_cancelled_exc_class()):
            ending = Ending.CLIENT_DISCONNECTED
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await lines.aclose()  # stops the engine's work before it is counted
            self._settle_later(usage(), ending)

    def _settle_later(self, used: FinalUsage, ending: Ending) -> None:
        """Settles in a task of its own, so the response's last chunk goes out now (`settled`
        waits for it)."""
        if self._platform is None or self._key is None or self._admitted is None or self._settling is not None:
            return
        self._settling = asyncio.ensure_future(self.settle(used, ending))
        running = platform_state(self._request).settling
        running[self._settling] = self._key.account_id
        self._settling.add_done_callback(lambda task: running.pop(task, None))

    async def settled(self) -> None:
        """Waits for a settlement `stream` started (never raises: `settle` logs its failures)."""
        if self._settling is not None:
            with anyio.CancelScope(shield=True):
                await asyncio.gather(self._settling, return_exceptions=True)

    async def close_stream(self) -> None:
        """Closes a stream the server stopped sending (the client left between two chunks): its
        own `finally` then settles what was produced."""
        if self._stream is not None:
            try:
                await self._stream.aclose()
            except RuntimeError:  # still running in the response's task, which will settle it
                pass


async def open_meter(request: Request, key: LoadAdmission) -> AsyncIterator[Meter]:
    meter = Meter(request, platform_state(request).platform, key)
    try:
        yield meter
    finally:
        await meter.close_stream()
        await meter.settled()
        if meter.hold_id is not None and meter.settlement is None:
            log.warning("request ended without settling hold %s: released free", meter.hold_id)
            await meter.settle(FinalUsage(), Ending.ERROR)


# "request" scope: the hold outlives the route function until a streamed response has been sent
HoldMeter = Annotated[Meter, Depends(open_meter, scope="request")]


# ---- x-ratelimit-* headers -------------------------------------------------------------------


def _remember(request: Request, requests: WindowState | None, tokens: WindowState | None) -> None:
    headers: dict[str, str] = request.scope.setdefault("state", {}).setdefault(_HEADERS_KEY, {})
    for kind, window in (("requests", requests), ("tokens", tokens)):
        if window is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(window.limit)
            headers[f"x-ratelimit-remaining-{kind}"] = str(window.remaining)
            headers[f"x-ratelimit-reset-{kind}"] = format_reset(window.reset_s)


def _rate_limited(outcome: RateLimited, request: Request) -> RateLimitError:
    recorded = request.scope.get("state", {}).get(_HEADERS_KEY, {})
    headers = {**recorded, "retry-after": str(outcome.retry_after_s)}
    if outcome.too_large:
        message = (
            f"This request's worst case ({outcome.kind}) is larger than your per-minute limit of "
            f"{outcome.window.limit}; lower max_tokens or n."
        )
    else:
        message = f"Rate limit reached for {outcome.kind} per minute (limit {outcome.window.limit}); retry after {outcome.retry_after_s} s."
    return RateLimitError(message, headers=headers)


def format_reset(seconds: float) -> str:
    """OpenAI's reset durations: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class RateLimitHeadersMiddleware:
    """Adds the `x-ratelimit-*` headers the dependencies recorded to whatever response goes out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # made here, so the route's copy of the scope shares it

        async def send_with_limits(message: Message) -> None:
            recorded = state.get(_HEADERS_KEY)
            if message["type"] == "http.response.start" and recorded:
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in recorded.items() if k.encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_limits)
