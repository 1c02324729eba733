"""A minimal app whose one route uses the platform dependencies the way the chat route does.

`POST /v1/work` takes the token counts directly (`prompt`, `max_tokens`, `n`, `produce`) so the
tests drive auth, limits, holds and settlement without a model. `fail: true` raises after the
hold; `stream: true` settles at the end of a streamed body.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from loom.api.deps import AuthedKey, HoldMeter, LoadAdmission, RateLimits, check_model_allowed, install_platform
from loom.api.errors import install_error_handlers, model_not_found
from loom.api.metrics import Metrics, install_metrics
from loom.api.routes_usage import usage_router
from loom.platform import Ending, Estimate, FinalUsage, Platform, PlatformConfig, RequestMeta

MODELS = ("m", "other")


def platform_app(platform: Platform | None, num_waiting: Callable[[], int] = lambda: 0) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    install_platform(app, platform, num_waiting)
    metrics = Metrics("m")
    install_metrics(app, metrics)
    app.state.metrics = metrics
    app.include_router(usage_router())

    @app.post("/v1/work")
    async def work(
        body: dict[str, Any], key: AuthedKey, _rate: RateLimits, _load: LoadAdmission, meter: HoldMeter
    ) -> Any:
        if body["model"] not in MODELS:
            raise model_not_found(body["model"])
        check_model_allowed(key, body["model"])
        estimate = Estimate(body["model"], body["prompt"], body["max_tokens"], body.get("n", 1))
        await meter.admit(estimate, RequestMeta(body.get("request_id"), body.get("user")))
        if body.get("fail"):
            raise RuntimeError("the engine failed")
        used = FinalUsage(body["prompt"], body.get("cached", 0), body["produce"])
        if body.get("stream"):
            produced = [0]

            async def events() -> AsyncIterator[str]:
                for i in range(body["produce"]):
                    produced[0] += 1
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(body.get("delay", 0))

            usage = lambda: FinalUsage(body["prompt"], body.get("cached", 0), produced[0])  # noqa: E731
            return StreamingResponse(meter.stream(events(), usage), media_type="text/event-stream")
        settled = await meter.settle(used, Ending.OK)
        return JSONResponse({"cost_micros": settled.cost_micros if settled else None, "hold_id": meter.hold_id})

    return app


@contextmanager
def live(app: FastAPI) -> Iterator[str]:
    """Serves `app` with uvicorn on a free loopback port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main(argv: list[str]) -> None:
    """`python platform_app.py DB_URL PORT REDIS_URL SCOPE`: one server process of a multi-process test."""
    db_url, port, redis_url, scope = argv
    platform = Platform(PlatformConfig(db_url=db_url, redis_url=redis_url, limits_scope=scope))
    app = platform_app(platform)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
