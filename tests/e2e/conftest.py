"""The real server, in-process: the default model behind uvicorn on a free loopback port.

One server for the whole session (loading the model is the slow part). Tests reach it through
the official `openai` SDK or raw `httpx`, and may look at the engine it serves (`engine`) to check
that requests leave no trace: no scheduled request, no stream, every KV block back in the pool.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from openai.types.chat import ChatCompletion

from loom.api.app import ServerConfig, create_app
from loom.api.limits import RequestLimits
from loom.api.server import server_config
from loom.engine import AsyncEngine, EngineConfig, EngineError, build_engine
from loom.models.default import DEFAULT_MODEL_HUB_ID, default_model_path
from loom.platform import Platform

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
STARTUP_TIMEOUT_S = 120.0
IDLE_TIMEOUT_S = 10.0
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()  # each test's reports, by phase


@dataclass(frozen=True, slots=True)
class LiveServer:
    base_url: str  # http://127.0.0.1:PORT, no trailing slash
    engine: AsyncEngine


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts its own server process (loads the model again)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keeps each phase's report on the item, so a teardown can tell whether the test itself failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _wait_healthy(base_url: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url}/health did not answer 200 within {STARTUP_TIMEOUT_S} s")


@contextmanager
def serve(
    server_fields: dict[str, Any] | None = None, platform: Platform | None = None, **engine_fields: Any
) -> Iterator[LiveServer]:
    """Builds an engine of the default model (float32, `engine_fields` over the suite's defaults)
    and serves it on a free port until the block ends; `server_fields` go to `ServerConfig`,
    `platform` (keys, billing, limits; None: off) to `create_app`."""
    server_fields = server_fields or {}
    model_path = str(default_model_path())
    fields: dict[str, Any] = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "kv_cache_gib": 0.25, **engine_fields}
    engine = build_engine(EngineConfig(model_path=model_path, served_model_name=MODEL, **fields))
    server_fields = {"reasoning_parser": "qwen3", **server_fields}  # SmolLM2 thinks only when a test makes it
    app = create_app(ServerConfig(served_model_names=(MODEL, DEFAULT_MODEL_HUB_ID), **server_fields), engine, platform)
    port = free_port()
    uv = uvicorn.Server(server_config(app, "127.0.0.1", port, app_limits(server_fields), "warning"))
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve()), name=f"loom-e2e-server-{port}", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base_url, thread)
        yield LiveServer(base_url, engine)
    finally:
        uv.should_exit = True
        thread.join(timeout=30)


def app_limits(server_fields: dict[str, Any]) -> RequestLimits:
    limits = server_fields.get("limits", RequestLimits())
    assert isinstance(limits, RequestLimits)
    return limits


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    with serve() as live:
        yield live


@pytest.fixture(scope="session")
def start_server() -> Callable[..., AbstractContextManager[LiveServer]]:
    """For a module that needs a second server with a different engine shape."""
    return serve


@pytest.fixture(scope="session")
def base_url(server: LiveServer) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def engine(server: LiveServer) -> AsyncEngine:
    return server.engine


@pytest.fixture(scope="session")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture
def async_client(server: LiveServer) -> Callable[[], openai.AsyncOpenAI]:
    """A factory, so each client is made (and closed, `async with`) on the test's own event loop."""
    return lambda: openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0, timeout=300)


def engine_is_idle(engine: AsyncEngine) -> bool:
    sched = engine.core.scheduler
    return (
        engine.num_active_requests == 0
        and not sched.requests
        and not sched.running
        and not sched.waiting
        and sched.kv.num_free_blocks == sched.kv.pool.num_blocks
    )


@pytest.fixture(scope="session")
def wait_idle(server: LiveServer) -> Callable[[float], bool]:
    """Polls until the engine holds no request and no KV block; False if it still does at the timeout."""

    def wait(timeout: float = IDLE_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if engine_is_idle(server.engine):
                return True
            time.sleep(0.05)
        return engine_is_idle(server.engine)

    return wait


@pytest.fixture(scope="session")
def chat(client: openai.OpenAI) -> Callable[..., ChatCompletion]:
    """`chat(prompt, **fields)`: one blocking completion of a single user message."""

    def create(prompt: str, **fields: Any) -> ChatCompletion:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **fields)

    return create


@pytest.fixture(scope="session")
def greedy(chat: Callable[..., ChatCompletion]) -> Callable[..., ChatCompletion]:
    """`greedy(prompt, max_tokens)`: the solo temperature-0 completion, computed once per session."""
    cache: dict[tuple[str, int], ChatCompletion] = {}

    def solo(prompt: str, max_tokens: int = 32) -> ChatCompletion:
        key = (prompt, max_tokens)
        if key not in cache:
            cache[key] = chat(prompt, temperature=0, max_tokens=max_tokens)
        return cache[key]

    return solo


def _force_drop_everything(engine: AsyncEngine) -> None:
    """After a leak: abort every request in the core and end every open stream the way a failed
    engine step does, so that one leaking test does not fail every test after it. Reaches into the
    engine's private command queue and loop: a best effort that gives up if they are renamed."""
    if not all(hasattr(engine, name) for name in ("_commands", "_loop", "_fail_streams")):
        return
    for req_id in list(engine.core.scheduler.requests):
        engine._commands.put(("abort", req_id))
    if engine._loop is not None:
        engine._loop.call_soon_threadsafe(engine._fail_streams, EngineError("dropped by the e2e test teardown"))


@pytest.fixture(autouse=True)
def _engine_left_idle(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test against the shared server must leave it with no request and every block free."""
    if "server" not in request.fixturenames:
        yield
        return
    wait = request.getfixturevalue("wait_idle")
    engine = request.getfixturevalue("engine")
    yield
    if wait(IDLE_TIMEOUT_S):
        return
    sched = engine.core.scheduler
    leak = (
        f"engine not idle after the test: streams={engine.num_active_requests} "
        f"requests={list(sched.requests)} free_blocks={sched.kv.num_free_blocks}/{sched.kv.pool.num_blocks}"
    )
    _force_drop_everything(engine)
    wait(IDLE_TIMEOUT_S)
    call = request.node.stash.get(_REPORTS, {}).get("call")
    if call is None or not call.failed:  # a failed test has already said what went wrong
        pytest.fail(leak)
