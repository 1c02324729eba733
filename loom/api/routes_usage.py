"""`GET /v1/usage` (and `/api/v1/usage`): the caller's own usage records, newest first.

Owns the wire shape of a record and the page parameters (`limit` 1..1000, `since` a Unix time,
`before` the id of the last record already seen). The account comes only from the credential,
never from a parameter, so a caller can see no one else's rows. Never writes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel

from loom.api.deps import RateLimits, platform_state, run_blocking
from loom.api.strict_json import StrictJSONRoute
from loom.platform import UsageRecord
from loom.platform.money import format_usd

USAGE_PATHS = ("/v1/usage", "/api/v1/usage")


class UsageRecordOut(BaseModel):
    id: str
    object: Literal["usage.record"] = "usage.record"
    created: int
    request_id: str | None
    model: str
    status: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_micros: int  # integer micro-dollars: exact
    cost_usd: str  # the same, as a decimal string
    latency_ms: int
    user: str | None


class UsagePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsageRecordOut]
    has_more: bool


def _out(r: UsageRecord) -> UsageRecordOut:
    return UsageRecordOut(
        id=r.id,
        created=int(r.created_at.timestamp()),
        request_id=r.request_id,
        model=r.model,
        status=r.status.value,
        prompt_tokens=r.prompt_tokens,
        cached_tokens=r.cached_tokens,
        completion_tokens=r.completion_tokens,
        total_tokens=r.prompt_tokens + r.completion_tokens,
        cost_micros=r.cost_micros,
        cost_usd=format_usd(r.cost_micros),
        latency_ms=r.latency_ms,
        user=r.user,
    )


def usage_router() -> APIRouter:
    router = APIRouter(route_class=StrictJSONRoute)

    async def list_usage(
        request: Request,
        key: RateLimits,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        since: Annotated[int | None, Query(ge=0, le=2**33)] = None,
        before: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    ) -> UsagePage:
        state = platform_state(request)
        platform = state.platform
        if platform is None or key is None:  # an open server bills no one, so it records no one
            return UsagePage(data=[], has_more=False)
        await state.settled(key.account_id)  # a stream that just ended may still be writing its row
        start = datetime.fromtimestamp(since, UTC) if since is not None else None
        rows = await run_blocking(lambda: platform.usage_records(key, limit=limit + 1, since=start, before=before))
        return UsagePage(data=[_out(r) for r in rows[:limit]], has_more=len(rows) > limit)

    for path in USAGE_PATHS:
        router.get(path, include_in_schema=path == USAGE_PATHS[0])(list_usage)
    return router
