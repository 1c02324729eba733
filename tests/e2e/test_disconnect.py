"""A client that goes away mid-request: the engine drops its requests and gets every KV block back.

Each request asks for 1500 tokens with `ignore_eos`, far more than a CPU makes in the few seconds
the test waits, so an engine that is idle again must have aborted the request, not finished it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from loom.engine import AsyncEngine

MODEL = "SmolLM2-135M-Instruct"
DROP_TIMEOUT_S = 10.0


def long_request(request_id: str, stream: bool, n: int = 1) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a very long story about the sea."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0 if n == 1 else 1,
        "n": n,
        "stream": stream,
        "request_id": request_id,
    }


@dataclass
class Sighting:
    seen: set[str] = field(default_factory=set)  # engine ids of the watched request the scheduler held


@contextmanager
def watch(engine: AsyncEngine, request_id: str) -> Iterator[Sighting]:
    """Records the engine ids (`<request_id>-<choice>-<nonce>`) the scheduler held while the block ran."""
    sighting = Sighting()
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            try:
                sighting.seen |= {r for r in list(engine.core.scheduler.requests) if r.startswith(request_id + "-")}
            except RuntimeError:  # the core thread changed the dict mid-copy: look again
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield sighting
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("n", [1, 2])
def test_closed_stream_aborts_its_requests_and_frees_blocks(
    base_url: str, engine: AsyncEngine, wait_idle: Callable[[float], bool], n: int
) -> None:
    req_id = f"e2e-drop-stream-{n}"
    with watch(engine, req_id) as sighting, httpx.Client(base_url=base_url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=long_request(req_id, True, n)) as resp:
            assert resp.status_code == 200
            lines = (line for line in resp.iter_lines() if line)
            head = [next(lines) for _ in range(n + 4)]  # roles, then tokens: generation is under way
            assert all(line.startswith("data: ") for line in head)
            assert engine.num_active_requests == n
            kv = engine.core.scheduler.kv
            assert kv.num_free_blocks < kv.pool.num_blocks
        # leaving the block closes the response mid-stream: the client is gone
    assert sorted(e.split("-")[-2] for e in sighting.seen) == [str(i) for i in range(n)]
    assert wait_idle(DROP_TIMEOUT_S), "the engine kept generating for a client that left"


def test_cancelled_blocking_request_is_dropped(
    base_url: str, engine: AsyncEngine, wait_idle: Callable[[float], bool]
) -> None:
    req_id = "e2e-drop-blocking"
    with watch(engine, req_id) as sighting, httpx.Client(base_url=base_url) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json=long_request(req_id, False), timeout=httpx.Timeout(1.0))
        deadline = time.monotonic() + 5  # on a loaded machine the request may reach the engine late
        while not sighting.seen and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(sighting.seen) == 1, "the request never reached the engine, so nothing was tested"
    assert wait_idle(DROP_TIMEOUT_S), "the engine kept generating for a client that left"


def test_server_serves_normally_after_disconnects(base_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200
    assert resp.json()["usage"]["completion_tokens"] == 3
