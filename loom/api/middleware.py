"""Pure ASGI middleware at the edge. (Starlette's `@app.middleware("http")` wraps the receive
channel, which hides `http.disconnect` from `Request.is_disconnected()`; a plain ASGI layer does not.)

- `RequestIdMiddleware`: every response carries `x-request-id`, and anything the app leaves
  unhandled becomes a plain 500 envelope here (logged, never re-raised), so the connection stays
  open for the client's next request.
- `BodyLimitMiddleware`: a request body larger than the limit is refused with 413 while it is read
  (a `content-length` over it before reading anything), a body slower than the timeout with 408;
  the app gets the body already read, so a route never buffers an unbounded one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.api.errors import error_envelope

log = logging.getLogger(__name__)


async def send_error(send: Send, status: int, message: str, error_type: str, code: str | None = None) -> None:
    body = json.dumps(error_envelope(message, error_type, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _is_printable_ascii(value: bytes) -> bool:
    return 0 < len(value) <= 256 and all(0x20 <= b < 0x7F for b in value)


class RequestIdMiddleware:
    """The route's own id, else the client's `x-request-id` (when printable ASCII), else a fresh one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"")
        fallback = incoming if _is_printable_ascii(incoming) else uuid.uuid4().hex.encode()
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", fallback))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in request %s", fallback.decode())
            if not started:
                await send_error(
                    send_with_id, 500, "The server had an error while processing your request.", "server_error"
                )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await send_error(
                    send, 408, f"The request body was not received within {self.timeout_s:g} s.",
                    "invalid_request_error", "request_timeout",
                )  # fmt: skip
                return
            if message["type"] == "http.disconnect":
                return  # the client left before sending its request: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, send: Send) -> None:
        await send_error(
            send, 413, f"The request body is larger than this server accepts ({self.max_bytes} bytes).",
            "invalid_request_error", "request_too_large",
        )  # fmt: skip


def _replay(body: bytes, receive: Receive) -> Receive:
    """The already-read body first, then the real channel (which reports a disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
