"""The benchmark's HTTP client: one streaming chat request timed token by token, and a load of them.

Owns the SSE reading (content, reasoning and tool-call deltas all count as tokens arriving; usage
from `stream_options.include_usage`, else one token per chunk; a stream is whole when it ends with
`[DONE]`, and an answer of no tokens is an answer, only without a TTFT), the per-request record (TTFT, the
gaps between chunks, end-to-end time, the text and tool calls for the scenarios to check), the
load shapes (at most C in flight, or sent at Poisson arrival times) and the live progress line. A
request that fails is recorded as failed, never raised: one bad answer does not end a phase.
Never computes statistics (`stats` does) and never starts a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx

CHAT_PATH = "/v1/chat/completions"


def api_root(url: str) -> str:
    """`http://host:8000/v1/` and `http://host:8000` both name the server at `http://host:8000`."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # the concatenated argument fragments: JSON text when the server kept its word


@dataclass(frozen=True, slots=True)
class RequestRecord:
    ok: bool
    error: str | None
    sent_at_s: float  # since the phase started
    e2e_s: float
    ttft_s: float | None  # sent -> first chunk carrying a token
    itl_s: tuple[float, ...]  # gaps between successive token-carrying chunks
    output_tokens: int
    prompt_tokens: int | None  # None when the server sent no usage
    finish_reason: str | None
    text: str
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (vLLM's definition)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(slots=True)
class Progress:
    """Live counters of one phase, printed as one line that rewrites itself on a terminal."""

    label: str
    total: int
    out: TextIO = field(default_factory=lambda: sys.stdout)
    interval_s: float = 1.0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        failed = f", {self.failed} failed" if self.failed else ""
        return f"[{self.label}] {self.done}/{self.total} done{failed}, {self.tokens:,} tokens, {rate:,.1f} tok/s, {elapsed:.1f}s"

    def show(self, final: bool = False) -> None:
        if self.out.isatty():
            self.out.write("\r\x1b[K" + self.line() + ("\n" if final else ""))
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    async def run(self, until: asyncio.Future[Any]) -> None:
        # Off a terminal a line per second floods a log; every 10 s is enough to see it moving.
        interval = self.interval_s if self.out.isatty() else max(self.interval_s, 10.0)
        while not until.done():
            await asyncio.wait({until}, timeout=interval)
            if not until.done():
                self.show()
        self.show(final=True)


@dataclass(slots=True)
class _StreamState:
    started: float
    first_at: float | None = None
    last_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0
    text: list[str] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)  # index -> [name, arguments]
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    done: bool = False  # saw `data: [DONE]`: a stream without it was cut

    def token_arrived(self, now: float) -> None:
        if self.last_at is not None:
            self.gaps.append(now - self.last_at)
        self.first_at = now if self.first_at is None else self.first_at
        self.last_at = now
        self.chunks += 1

    def take(self, chunk: dict[str, Any], now: float) -> bool:
        """Absorbs one chunk; True when it carried a token."""
        self.usage = chunk.get("usage") or self.usage
        carried = False
        for choice in chunk.get("choices") or []:
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
            delta = choice.get("delta") or {}
            for key in ("content", "reasoning_content", "reasoning"):
                if delta.get(key):
                    carried = True
                    if key == "content":
                        self.text.append(delta[key])
            for call in delta.get("tool_calls") or []:
                name_args = self.calls.setdefault(int(call.get("index", 0)), ["", ""])
                function = call.get("function") or {}
                name_args[0] += function.get("name") or ""
                name_args[1] += function.get("arguments") or ""
                carried = True
        if carried:
            self.token_arrived(now)
        return carried


def _record(state: _StreamState, sent_at: float, error: str | None) -> RequestRecord:
    now = time.perf_counter()
    usage = state.usage or {}
    output = int(usage.get("completion_tokens", state.chunks))
    prompt = usage.get("prompt_tokens")
    calls = tuple(ToolCall(name, args) for _, (name, args) in sorted(state.calls.items()))
    if error is None and not state.done:
        error = "the stream ended without data: [DONE]"
    return RequestRecord(
        ok=error is None, error=error, sent_at_s=sent_at, e2e_s=now - state.started,
        ttft_s=None if state.first_at is None else state.first_at - state.started, itl_s=tuple(state.gaps),
        output_tokens=output, prompt_tokens=None if prompt is None else int(prompt),
        finish_reason=state.finish_reason, text="".join(state.text), tool_calls=calls,
    )  # fmt: skip


async def stream_chat(
    client: httpx.AsyncClient, body: dict[str, Any], progress: Progress | None = None, sent_at: float = 0.0
) -> RequestRecord:
    """One streaming chat request to its end; failures come back as a record with `ok` False."""
    state = _StreamState(time.perf_counter())
    error: str | None = None
    try:
        async with client.stream("POST", CHAT_PATH, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                return _record(state, sent_at, f"HTTP {response.status_code}: {detail[:300]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    state.done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    break
                if state.take(chunk, time.perf_counter()) and progress is not None:
                    progress.tokens += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return _record(state, sent_at, error)


async def run_load(
    client: httpx.AsyncClient,
    bodies: Sequence[dict[str, Any]],
    progress: Progress,
    concurrency: int | None = None,
    offsets: Sequence[float] | None = None,
) -> tuple[list[RequestRecord], float]:
    """Sends every body (at most `concurrency` in flight; each not before its offset in seconds)
    and returns the records in body order and the wall time from the first send to the last end."""
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    start = time.perf_counter()
    progress.started = start

    async def one(body: dict[str, Any], offset: float) -> RequestRecord:
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit if limit is not None else contextlib.nullcontext():
            record = await stream_chat(client, body, progress, time.perf_counter() - start)
        progress.done += 1
        progress.failed += not record.ok
        return record

    schedule = offsets if offsets is not None else [0.0] * len(bodies)
    gathered = asyncio.ensure_future(asyncio.gather(*(one(b, o) for b, o in zip(bodies, schedule, strict=True))))
    await asyncio.gather(progress.run(gathered), gathered)
    return list(gathered.result()), time.perf_counter() - start
