"""The uvicorn server around the app, with a deadline for request heads.

Owns `server_config`: the one way `loom serve` and the end-to-end tests build uvicorn. uvicorn
bounds the size of a request head (h11's 16 KiB) and the idle time between requests
(`timeout_keep_alive`) but not the time a client takes to send a head: a connection that
trickles a half request line would stay open forever. `_HeadDeadlineProtocol` closes a
connection whose next request head is not complete within `header_timeout_s` (body deadlines are
`BodyLimitMiddleware`'s).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from loom.api.limits import RequestLimits


class _HeadDeadlineProtocol(H11Protocol):
    header_timeout_s = 10.0  # set per server by `server_config`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _head_overdue(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self._head_deadline is not None:
            self._head_deadline.cancel()  # the head is complete: the body has its own deadline
            self._head_deadline = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        super().connection_lost(exc)


def server_config(app: Any, host: str, port: int, limits: RequestLimits, log_level: str = "info") -> uvicorn.Config:
    protocol = type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), {"header_timeout_s": limits.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol)
