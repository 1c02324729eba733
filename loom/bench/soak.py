"""`loom bench --soak MINUTES`: ordinary requests from N concurrent streams against one server for a
while, reporting errors, requests done and the server's resident memory (RSS) over time.

Owns the request mix (seeded: a unique prompt of varied length per request, streaming and
blocking, some with logprobs, `n: 2`, stop strings, a seed and a penalty), the RSS sampler (the
server's pid: known when the bench starts the server, `--server-pid` with `--url`), the live
progress line, the verdict (RSS at the end against RSS after the first minute, which is warm-up)
and the JSON report. Never imports the engine: it talks HTTP like any client, so it can soak any
OpenAI-compatible server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loom.bench.server import LoomBenchError, free_port, server_command, start_server, stop_server, wait_for_health

Log = Callable[[str], None]
_WORDS = (
    "river town bread harbour market lantern boat gull spice quay dawn noon evening voice cart "
    "baker oven net tide sail rope anchor shell salt wind storm light bridge stone road"
).split()
_MAX_ERROR_EXAMPLES = 10


@dataclass(frozen=True, slots=True)
class SoakSettings:
    url: str
    duration_s: float
    streams: int = 64
    max_tokens: int = 32
    sample_interval_s: float = 10.0
    reference_s: float = 60.0  # the RSS the end is compared with: the first sample from here on
    max_growth_pct: float = 5.0
    request_timeout_s: float = 600.0
    seed: int = 0
    server_pid: int | None = None


@dataclass(frozen=True, slots=True)
class RssSample:
    t_s: float
    rss_mb: float | None  # None: no pid given, or the process is gone
    requests_done: int
    errors: int
    load_average_1m: float


@dataclass(slots=True)
class SoakReport:
    settings: SoakSettings
    model_id: str = ""
    wall_s: float = 0.0
    requests_done: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    samples: list[RssSample] = field(default_factory=list)
    rss_reference_mb: float | None = None  # the first sample at or after settings.reference_s
    rss_end_mb: float | None = None
    rss_growth_pct: float | None = None  # end against reference, in percent
    verdict: str = ""  # "ok", "errors", "rss grew", "rss not sampled", "too short to judge"

    @property
    def passed(self) -> bool:
        return self.verdict in ("ok", "rss not sampled", "too short to judge")


class SoakError(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def process_rss_mb(pid: int | None) -> float | None:
    """The resident set of `pid` in MiB (Linux /proc, else psutil if installed); None if unknown."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]

        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except Exception:  # no psutil, or no such process: RSS is simply not known
        return None


def soak_request(index: int, rng: random.Random, model_id: str, max_tokens: int) -> dict[str, Any]:
    """Request `index` of the mix: one in two streams; one in ten each adds one feature."""
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 60)))
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": f"Request {index}: tell me about {words}"}],
        "max_tokens": rng.randint(max(1, max_tokens // 2), max_tokens),
        "temperature": rng.choice([0.0, 0.7, 1.0]),
        "stream": index % 2 == 0,
    }
    extra: dict[int, dict[str, Any]] = {
        1: {"logprobs": True, "top_logprobs": 3},
        3: {"n": 2},
        5: {"stop": ["\n\n", "."]},
        7: {"seed": index, "presence_penalty": 0.5},
    }
    body.update(extra.get(index % 10, {}))
    if body["stream"] and index % 4 == 0:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
    """One request to its end; raises `SoakError` saying how it failed."""
    try:
        if not body["stream"]:
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                raise SoakError(f"http {response.status_code}", response.text[:200])
            if not response.json().get("choices"):
                raise SoakError("bad body", response.text[:200])
            return
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise SoakError(f"http {response.status_code}", (await response.aread()).decode(errors="replace")[:200])
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    return
                if "error" in json.loads(payload):
                    raise SoakError("error event", payload[:200])
        raise SoakError("stream cut", "the stream ended without [DONE]")
    except httpx.TimeoutException as exc:
        raise SoakError("timeout", repr(exc)) from exc
    except httpx.TransportError as exc:
        raise SoakError("transport", repr(exc)) from exc
    except json.JSONDecodeError as exc:
        raise SoakError("bad json", str(exc)) from exc


class _Soak:
    """The state the streams and the sampler share (one event loop: no locks)."""

    def __init__(self, settings: SoakSettings, model_id: str, log: Log) -> None:
        self.settings, self.model_id, self.log = settings, model_id, log
        self.report = SoakReport(settings, model_id)
        self.rng = random.Random(settings.seed)
        self.next_index = 0
        self.errors: Counter[str] = Counter()
        self.started = time.monotonic()
        self.deadline = self.started + settings.duration_s

    async def stream(self, client: httpx.AsyncClient) -> None:
        while time.monotonic() < self.deadline:
            body = soak_request(self.next_index, self.rng, self.model_id, self.settings.max_tokens)
            self.next_index += 1
            try:
                await send(client, body)
                self.report.requests_done += 1
            except SoakError as exc:
                self.errors[exc.kind] += 1
                self.report.errors += 1
                if len(self.report.error_examples) < _MAX_ERROR_EXAMPLES:
                    self.report.error_examples.append(str(exc))

    def sample(self) -> RssSample:
        report = self.report
        sample = RssSample(
            round(time.monotonic() - self.started, 3), process_rss_mb(self.settings.server_pid),
            report.requests_done, report.errors, os.getloadavg()[0],
        )  # fmt: skip
        report.samples.append(sample)
        if report.rss_reference_mb is None and sample.t_s >= self.settings.reference_s:
            report.rss_reference_mb = sample.rss_mb
        self.log(progress_line(sample, self.settings, report.rss_reference_mb))
        return sample

    async def sampler(self, streams: asyncio.Future[Any]) -> None:
        while not streams.done():
            self.sample()
            await asyncio.wait({streams}, timeout=self.settings.sample_interval_s)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def progress_line(sample: RssSample, settings: SoakSettings, reference_mb: float | None) -> str:
    rate = sample.requests_done / sample.t_s if sample.t_s > 0 else 0.0
    rss = "rss -" if sample.rss_mb is None else f"rss {sample.rss_mb:,.1f} MB"
    if sample.rss_mb is not None and reference_mb:
        rss += f" ({(sample.rss_mb / reference_mb - 1) * 100:+.1f}% vs {_clock(settings.reference_s)})"
    return (
        f"soak {_clock(sample.t_s)}/{_clock(settings.duration_s)}  done {sample.requests_done:,} ({rate:.1f}/s)  "
        f"errors {sample.errors}  {rss}  load {sample.load_average_1m:.2f}"
    )


def judge(report: SoakReport) -> None:
    """Fills the end RSS, the growth against the first minute and the verdict."""
    settings = report.settings
    report.rss_end_mb = report.samples[-1].rss_mb if report.samples else None
    if report.rss_reference_mb and report.rss_end_mb is not None:
        report.rss_growth_pct = (report.rss_end_mb / report.rss_reference_mb - 1) * 100
    if report.errors:
        report.verdict = "errors"
    elif settings.server_pid is None or report.rss_end_mb is None:
        report.verdict = "rss not sampled"
    elif report.rss_growth_pct is None:
        report.verdict = "too short to judge"
    elif report.rss_growth_pct > settings.max_growth_pct:
        report.verdict = "rss grew"
    else:
        report.verdict = "ok"


async def run_soak(settings: SoakSettings, log: Log) -> SoakReport:
    """Drives `settings.streams` streams of the request mix until `duration_s` is over, then waits
    for the requests in flight and takes a last sample."""
    limits = httpx.Limits(max_connections=settings.streams + 4, max_keepalive_connections=settings.streams)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    async with httpx.AsyncClient(base_url=settings.url, limits=limits, timeout=timeout) as client:
        response = await client.get("/v1/models")
        if response.status_code != 200:
            raise LoomBenchError(f"GET /v1/models answered {response.status_code}: {response.text[:200]}")
        soak = _Soak(settings, str(response.json()["data"][0]["id"]), log)
        log(f"soak: {settings.streams} streams for {_clock(settings.duration_s)} against {settings.url} "
            f"(model {soak.model_id!r}, server pid {settings.server_pid})")  # fmt: skip
        streams = asyncio.gather(*(soak.stream(client) for _ in range(settings.streams)))
        await asyncio.gather(soak.sampler(streams), streams)
    soak.sample()
    report = soak.report
    report.wall_s = round(time.monotonic() - soak.started, 3)
    report.error_kinds = dict(soak.errors)
    judge(report)
    return report


def summary_lines(report: SoakReport) -> list[str]:
    settings = report.settings
    lines = [
        f"soak: {report.requests_done:,} requests in {_clock(report.wall_s)} from {settings.streams} streams, "
        f"{report.errors} errors {report.error_kinds or ''}".rstrip()
    ]
    if report.rss_growth_pct is not None:
        lines.append(
            f"soak: server RSS {report.rss_reference_mb:,.1f} MB after {_clock(settings.reference_s)}, "
            f"{report.rss_end_mb:,.1f} MB at the end: {report.rss_growth_pct:+.2f}% (limit {settings.max_growth_pct:g}%)"
        )
    lines.append(f"soak: verdict {report.verdict}")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("soak mode (--soak MINUTES: memory and errors under steady load)")
    group.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="run a soak this long instead")
    group.add_argument("--soak-streams", type=int, default=64, help="concurrent streams")
    group.add_argument("--soak-max-tokens", type=int, default=32, help="each request asks for max/2..max tokens")
    group.add_argument("--soak-sample-s", type=float, default=10.0, help="seconds between RSS samples")
    group.add_argument("--soak-reference-s", type=float, default=60.0, help="RSS at the end is compared with this")
    group.add_argument("--soak-max-growth-pct", type=float, default=5.0, help="above this the soak fails")
    group.add_argument("--soak-seed", type=int, default=0, help="seed of the request mix")
    group.add_argument("--server-pid", type=int, default=None, help="with --url: the server process to sample")


def settings_from_args(args: argparse.Namespace, url: str, server_pid: int | None) -> SoakSettings:
    return SoakSettings(
        url=url, duration_s=args.soak * 60, streams=args.soak_streams, max_tokens=args.soak_max_tokens,
        sample_interval_s=args.soak_sample_s, reference_s=args.soak_reference_s,
        max_growth_pct=args.soak_max_growth_pct, request_timeout_s=args.request_timeout, seed=args.soak_seed,
        server_pid=server_pid,
    )  # fmt: skip


def _print(message: str) -> None:
    print(message, flush=True)


def run_soak_command(args: argparse.Namespace, stamp: str, log: Log = _print) -> int:
    """`loom bench --soak`: against `--url`, or a server it starts (and stops); 0 when it passed."""
    path = Path(args.results_dir) / f"{stamp}-soak.json"
    try:
        if args.url:
            if args.server_pid is None:
                log("soak: no --server-pid: errors are counted, the server's RSS is not sampled")
            report = asyncio.run(run_soak(settings_from_args(args, args.url.rstrip("/"), args.server_pid), log))
        else:
            report = _soak_own_server(args, stamp, log)
    except (LoomBenchError, httpx.HTTPError, KeyError, ValueError) as exc:
        log(f"soak: FAILED: {type(exc).__name__}: {exc}")
        return 1
    for line in summary_lines(report):
        log(line)
    payload = {"args": vars(args), "passed": report.passed, "soak": asdict(report)}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {path}")
    return 0 if report.passed else 1


def _soak_own_server(args: argparse.Namespace, stamp: str, log: Log) -> SoakReport:
    port = free_port()
    log_path = Path(args.results_dir) / f"{stamp}-soak-server.log"
    proc = start_server(server_command(args.model, args.dtype, port, args.server_arg), log_path, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, proc, args.startup_timeout, log_path, log)
        return asyncio.run(run_soak(settings_from_args(args, url, proc.pid), log))
    finally:
        stop_server(proc, log)
