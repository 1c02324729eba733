"""A generating request's platform side after admission, shared by the chat and completions routes.

Owns the worst-case `Estimate` of a prepared request (what the hold and tokens-per-minute count),
and `MeteredRun`: one request's hold (`Meter`), metrics clock (`RequestTimer`) and engine tally
(`Produced`) from admission to the end, however it ends:

    ending                                 billed                       settled with
    finished (blocking or streamed)        ok                           the usage the client was shown
    client left (blocking or streamed)     client_disconnected          what the engine made up to the abort
    server failed                          error: costs nothing         what the engine made (recorded only)

Never decides who may call or what a token costs (`loom.platform` does), and never samples.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import TypeVar

import anyio
from fastapi import Request

from loom.api.deps import Meter
from loom.api.metrics import RequestTimer
from loom.api.render import StreamProgress
from loom.platform import Ending, Estimate, FinalUsage
from loom.serving.produced import Produced
from loom.serving.types import Usage

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5


def estimate(
    model: str, prompt_lengths: Sequence[int], max_tokens: int | None, num_candidates: int, max_model_len: int
) -> Estimate:
    """The worst case of a prepared request: every prompt runs `num_candidates` sequences of
    `max_tokens` each, or of as many as the context window leaves after its prompt."""
    max_new = max_tokens if max_tokens is not None else max_model_len - min(prompt_lengths)
    return Estimate(model, sum(prompt_lengths), max(max_new, 0), num_candidates * len(prompt_lengths))


def final_usage(usage: Usage) -> FinalUsage:
    return FinalUsage(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)


class MeteredRun:
    """One admitted request: pass `produced` to serving, then run it through `blocking` or `stream`."""

    def __init__(self, meter: Meter, timer: RequestTimer) -> None:
        self.meter = meter
        self.timer = timer
        self.produced = Produced(on_tokens=timer.tokens)

    async def blocking(
        self, request: Request, work: Awaitable[T], shown: Callable[[T], tuple[Usage, str | None]]
    ) -> T | None:
        """Runs `work`; None if the client left first (its work is cancelled, which aborts its
        engine requests, and what was made is billed). `shown(result)` is the usage the answer
        reports and its finish reason."""
        try:
            result = await _unless_disconnected(request, work)
        except Exception:
            await self.meter.settle(final_usage(self.produced.usage()), Ending.ERROR)
            raise
        if result is None:
            await self._end(self.produced.usage(), Ending.CLIENT_DISCONNECTED, "abort")
            return None
        usage, finish_reason = shown(result)
        await self._end(usage, Ending.OK, finish_reason or "stop")
        return result

    def stream(self, lines: AsyncGenerator[str, None], progress: StreamProgress) -> AsyncGenerator[str, None]:
        """`lines` (a writer's, whose running state is `progress`) settled when they end: with the
        final usage chunk's numbers once every delta was written, else with what the engine made."""

        def usage() -> FinalUsage:
            return final_usage(progress.usage if progress.complete else self.produced.usage())

        return self.meter.stream(self._timed(lines, progress), usage=usage, failed=lambda: progress.failed)

    async def _timed(self, lines: AsyncGenerator[str, None], progress: StreamProgress) -> AsyncGenerator[str, None]:
        try:
            async for line in lines:
                yield line
        finally:
            with anyio.CancelScope(shield=True):  # the engine stops before what it made is read
                await lines.aclose()
            if progress.complete:
                self.timer.finish(
                    progress.usage.prompt_tokens, progress.usage.completion_tokens, progress.finish_reason or "stop"
                )
            elif not progress.failed:
                used = self.produced.usage()
                self.timer.finish(used.prompt_tokens, used.completion_tokens, "abort")

    async def _end(self, usage: Usage, ending: Ending, finish_reason: str) -> None:
        self.timer.finish(usage.prompt_tokens, usage.completion_tokens, finish_reason)
        await self.meter.settle(final_usage(usage), ending)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
    return task.result()
