"""Connection-level containment on a real uvicorn server (the toy engine behind it): heads and
bodies have deadlines, and no error answer closes a keep-alive connection."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from conftest import MODEL, chat_body
from toy_engine import ToyEngine

from loom.api.app import create_app
from loom.api.config import ServerConfig
from loom.api.limits import RequestLimits
from loom.api.server import server_config

LIMITS = RequestLimits(header_timeout_s=0.5, body_timeout_s=0.5, max_body_bytes=10_000)


ENGINE = ToyEngine()


@pytest.fixture(scope="module")
def address() -> Iterator[tuple[str, int]]:
    app = create_app(ServerConfig(served_model_names=(MODEL,), limits=LIMITS), ENGINE)  # type: ignore[arg-type]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(app, "127.0.0.1", port, LIMITS, "warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield "127.0.0.1", port
    server.should_exit = True
    thread.join(timeout=5)


def test_a_half_sent_head_is_closed_after_the_deadline(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 3


def test_an_idle_connection_is_closed_after_the_deadline(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        assert sock.recv(1024) == b""


def test_a_half_sent_body_is_408(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\": "
        )
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"x-request-id" in reply.lower()


def test_errors_keep_the_connection_alive(address: tuple[str, int]) -> None:
    host, port = address
    with httpx.Client(base_url=f"http://{host}:{port}", timeout=5) as client:
        seen: set[int] = set()

        def remember_socket(response: httpx.Response) -> None:
            stream = response.extensions.get("network_stream")
            if stream is not None:
                seen.add(id(stream))

        client.event_hooks["response"] = [remember_socket]
        statuses = [
            client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}).status_code,
            client.post("/v1/chat/completions", json=chat_body(n="2")).status_code,
            client.get("/v1/nothing-here").status_code,
            client.post("/v1/chat/completions", json=chat_body(max_tokens=1)).status_code,
        ]
        assert statuses == [400, 422, 404, 200]
        assert len(seen) == 1  # one connection served all of them


def test_a_500_has_the_request_id_and_keeps_the_connection(
    address: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: object, **_kwargs: object) -> AsyncIterator[object]:
        raise RuntimeError("/internal/path exploded")
        yield

    body = json.dumps(chat_body(max_tokens=1)).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    request += b"Content-Length: %d\r\n\r\n" % len(body) + body
    with socket.create_connection(address, timeout=5) as sock:
        monkeypatch.setattr(ENGINE, "generate", broken)
        sock.sendall(request)
        failed = _read_response(sock)
        monkeypatch.undo()
        sock.sendall(request)  # the same connection serves the next request
        served = _read_response(sock)
    assert failed.startswith(b"HTTP/1.1 500")
    assert b"x-request-id" in failed.lower()
    assert b"exploded" not in failed and b"internal" not in failed
    assert served.startswith(b"HTTP/1.1 200")


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += sock.recv(4096)
    return head + b"\r\n\r\n" + rest
