"""`loom bench --soak`: the soak machinery run for a few seconds against a real uvicorn server
(the toy engine behind the real app), sampling this process's RSS as the server's."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import uvicorn
from toy_engine import ToyEngine

from loom.api.app import create_app
from loom.api.config import ServerConfig
from loom.bench import serve_bench
from loom.bench.soak import SoakSettings, run_soak, soak_request
from loom.engine import EngineError, RequestOutput, SamplingParams

MODEL = "toy"


class FailingToyEngine(ToyEngine):
    """Fails every third request the way a broken engine step does."""

    def __init__(self) -> None:
        super().__init__(max_model_len=4096)
        self.num_calls = 0

    async def generate(
        self, req_id: str, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        self.num_calls += 1
        if self.num_calls % 3 == 0:
            raise EngineError("injected failure")
        async for out in super().generate(req_id, prompt_ids, params, priority, cache_salt):
            yield out


def serve_toy(engine: ToyEngine) -> Iterator[str]:
    app = create_app(ServerConfig(served_model_names=(MODEL,)), engine)  # type: ignore[arg-type]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def toy_url() -> Iterator[str]:
    yield from serve_toy(ToyEngine(max_model_len=4096))


@pytest.fixture(scope="module")
def failing_url() -> Iterator[str]:
    yield from serve_toy(FailingToyEngine())


def test_the_request_mix_is_seeded_and_covers_streaming_blocking_and_features() -> None:
    import random

    first = [soak_request(i, random.Random(7), MODEL, 16) for i in range(20)]
    again = [soak_request(i, random.Random(7), MODEL, 16) for i in range(20)]
    assert first == again
    assert {b["stream"] for b in first} == {True, False}
    assert len({b["messages"][0]["content"] for b in first}) == 20  # every prompt its own
    assert all(8 <= b["max_tokens"] <= 16 for b in first)
    for feature in ("logprobs", "n", "stop", "seed", "stream_options"):
        assert any(feature in b for b in first), feature


def test_cli_soak_reports_requests_rss_samples_and_the_growth_verdict(toy_url: str, tmp_path: Path) -> None:
    argv = [
        "--url", toy_url, "--server-pid", str(os.getpid()), "--soak", str(3 / 60), "--soak-streams", "4",
        "--soak-sample-s", "0.5", "--soak-reference-s", "1", "--soak-max-growth-pct", "1000",
        "--results-dir", str(tmp_path),
    ]  # fmt: skip
    assert serve_bench.main(argv) == 0
    [path] = tmp_path.glob("*-soak.json")
    soak = json.loads(path.read_text())["soak"]
    assert soak["errors"] == 0 and soak["error_kinds"] == {}
    assert soak["requests_done"] > 10
    assert soak["verdict"] == "ok"
    samples = soak["samples"]
    assert len(samples) >= 5  # every 0.5 s over 3 s, plus the last one
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert all(s["rss_mb"] > 0 and s["load_average_1m"] >= 0 for s in samples)
    assert samples[-1]["requests_done"] == soak["requests_done"]
    reference = next(s["rss_mb"] for s in samples if s["t_s"] >= 1)
    assert soak["rss_reference_mb"] == reference
    assert soak["rss_end_mb"] == samples[-1]["rss_mb"]
    assert soak["rss_growth_pct"] == pytest.approx((soak["rss_end_mb"] / reference - 1) * 100)


def test_errors_are_counted_by_kind_and_fail_the_soak(failing_url: str) -> None:
    settings = SoakSettings(
        failing_url, duration_s=1.5, streams=3, max_tokens=4, sample_interval_s=0.5, reference_s=0.5
    )
    report = asyncio.run(run_soak(settings, lambda line: None))
    assert report.requests_done > 0 and report.errors > 0
    assert sum(report.error_kinds.values()) == report.errors
    assert set(report.error_kinds) == {"http 500", "error event"}  # blocking and streaming failures
    assert report.error_examples and report.verdict == "errors" and not report.passed
    assert report.samples[-1].rss_mb is None  # no pid given: RSS is not sampled, errors still are


def test_server_pid_without_url_is_refused() -> None:
    with pytest.raises(SystemExit):
        serve_bench.parse_args(["--soak", "1", "--server-pid", "1"])
