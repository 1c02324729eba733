"""What the provider platform costs: the same streaming load with auth + billing + limits on, as a
ratio of the run with the platform off (`loom serve --no-platform`).

For each setting (off; SQLite; PostgreSQL when `--pg URL` is given) it prepares the database with
the admin commands (a price, an account with credit, a key with RPM and TPM limits far above the
load, so every check runs and none refuses) and starts `loom serve` on it (`--max-queued-requests`
on too). Then, after a warm-up round on each (the same load, not counted), `--repeats` rounds of
`--concurrency` concurrent streaming chat requests, alternating between the servers round by round
(only one works at a time; an idle one sleeps), and reports output tokens/s: the median round, and
its ratio to the off run. Each round's prompts are numbered apart, so the prefix cache serves no
round from an earlier one; every setting gets the same prompts. A tool, not a test: it asserts
nothing. Talks to the servers over HTTP and to the database only through `loom`'s admin commands.

    python -m loom.bench.platform_overhead --pg postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

WORDS = "the quick brown fox jumps over the lazy dog while a patient river carves its valley".split()
UNLIMITED_RPM, UNLIMITED_TPM = 1_000_000, 1_000_000_000


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    db_url: str | None  # None: --no-platform


@dataclass(frozen=True, slots=True)
class Result:
    name: str
    rounds: tuple[float, ...]  # output tokens/s of each round

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def loom(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "loom.cli", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loom {shlex.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def prepare(db_url: str, model: str, account: str) -> str:
    """A priced model, a funded account and a key whose limits are on but never reached; the key."""
    loom("prices", "set", model, "--input", "0.10", "--cached-input", "0.05", "--output", "0.40", "--db", db_url)
    loom("credits", "add", "--account", account, "1000000", "--db", db_url)
    limits = ["--rpm", str(UNLIMITED_RPM), "--tpm", str(UNLIMITED_TPM)]
    return loom("keys", "create", "--account", account, *limits, "--db", db_url).strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(setting: Setting, port: int, server_args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    platform = (
        ["--no-platform"] if setting.db_url is None else ["--db", setting.db_url, "--max-queued-requests", "1000"]
    )
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--port", str(port), *platform, *server_args]
    print(f"  $ {shlex.join(cmd)}", flush=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no healthy server after {timeout_s:.0f} s (log: {log_path})")


async def one_stream(client: httpx.AsyncClient, body: dict[str, object]) -> int:
    """Streams one chat answer to its end; its completion tokens (from the final usage chunk)."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        usage = None
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    if usage is None:
        raise RuntimeError("a stream ended without its usage chunk")
    return int(usage["completion_tokens"])


def body(model: str, prompt_words: int, max_tokens: int, index: int) -> dict[str, object]:
    text = " ".join(WORDS[(index + i) % len(WORDS)] for i in range(prompt_words))
    return {
        "model": model,
        "messages": [{"role": "user", "content": f"{index}: {text}"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass(slots=True)
class Server:
    setting: Setting
    url: str
    key: str | None
    proc: subprocess.Popen[bytes]


def start_all(settings: Sequence[Setting], args: argparse.Namespace, workdir: Path) -> list[Server]:
    """Every setting's server, each prepared and healthy. An idle server costs no CPU (its engine
    thread sleeps on its queue), so rounds can alternate between them."""
    server_args = [token for value in args.server_arg for token in shlex.split(value)]
    servers = []
    try:
        for setting in settings:
            key = prepare(setting.db_url, args.model_name, f"bench-{os.getpid()}") if setting.db_url else None
            port, log_path = free_port(), workdir / f"{setting.name}-server.log"
            servers.append(
                Server(setting, f"http://127.0.0.1:{port}", key, start(setting, port, server_args, log_path))
            )
            wait_healthy(servers[-1].url, servers[-1].proc, log_path)
    except BaseException:
        for server in servers:
            stop(server.proc)
        raise
    return servers


async def measure_all(servers: Sequence[Server], args: argparse.Namespace) -> list[Result]:
    """Rounds alternate between the settings (off, sqlite, pg, off, ...), so a change of the
    machine's load during the run falls on all of them alike."""
    rounds: dict[str, list[float]] = {s.setting.name: [] for s in servers}
    for r in range(args.repeats + 1):  # round 0 warms every server up and is not counted
        for server in servers:
            tokens_per_s = await measure_round(server, args, r)
            if r > 0:
                rounds[server.setting.name].append(tokens_per_s)
                print(
                    f"  round {r} {server.setting.name}: {tokens_per_s:.1f} tok/s (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    return [Result(name, tuple(values)) for name, values in rounds.items()]


async def measure_round(server: Server, args: argparse.Namespace, round_index: int) -> float:
    headers = {"authorization": f"Bearer {server.key}"} if server.key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=600) as client:
        first = round_index * 1000  # round 0 (the same load) warms up every kernel shape, uncounted
        start = time.perf_counter()
        counts = await asyncio.gather(
            *(
                one_stream(client, body(args.model_name, args.prompt_words, args.max_tokens, first + i))
                for i in range(args.concurrency)
            )
        )
        return sum(counts) / (time.perf_counter() - start)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loom.bench.platform_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32, help="concurrent streams per round")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per stream (EOS ignored)")
    p.add_argument("--prompt-words", type=int, default=100, help="words in each user message")
    p.add_argument("--repeats", type=int, default=3, help="rounds per setting (the median is reported)")
    p.add_argument("--pg", default=None, metavar="URL", help="also measure on this PostgreSQL database")
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct", help="the served model's first name (priced)")
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra `loom serve` args, shell-split (repeatable)"
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers (their own sessions)
    with tempfile.TemporaryDirectory(prefix="loom-platform-bench-") as tmp:
        workdir = Path(tmp)
        settings = [Setting("off", None), Setting("sqlite", f"sqlite:///{workdir / 'loom.db'}")]
        if args.pg:
            settings.append(Setting("postgresql", args.pg))
        servers = start_all(settings, args, workdir)
        try:
            load_before = _loadavg()
            results = asyncio.run(measure_all(servers, args))
            load_after = _loadavg()
        finally:
            for server in servers:
                stop(server.proc)
    off = results[0].median
    print(f"\n{args.concurrency} concurrent streams x {args.max_tokens} tokens, median of {args.repeats} rounds")
    print("setting     | tok/s (median) | rounds                 | ratio to off")
    for r in results:
        rounds = ", ".join(f"{x:.1f}" for x in r.rounds)
        print(f"{r.name:<11} | {r.median:>14.1f} | {rounds:<22} | {r.median / off:.3f}")
    print(f"/proc/loadavg before: {load_before}; after: {load_after}")
    return 0


def _loadavg() -> str:
    path = Path("/proc/loadavg")
    return path.read_text().strip() if path.exists() else "?"


if __name__ == "__main__":
    sys.exit(main())
