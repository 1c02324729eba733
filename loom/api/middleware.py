"""Pure ASGI middleware. (Starlette's `@app.middleware("http")` wraps the receive channel, which
hides `http.disconnect` from `Request.is_disconnected()`; a plain ASGI layer does not.)"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestIdMiddleware:
    """Every response carries `x-request-id`: the route's own, else the client's, else a fresh one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id")
        fallback = incoming or uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", fallback))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)
