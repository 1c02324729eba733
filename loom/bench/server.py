"""A server process a benchmark starts for itself (Loom or a peer): start, wait for `/health`, stop.

Owns the child process (its own session, so everything it forks is reaped), its log file, the
`python -m loom.cli serve` command line and the errors that say why a server never became
healthy. Never talks the chat API: the benchmarks do, over HTTP, like any client.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from subprocess import STDOUT, Popen, TimeoutExpired

import httpx

Log = Callable[[str], None]


class LoomBenchError(RuntimeError):
    """A target could not produce numbers (server died, bad response, timeout)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(model: str, dtype: str, port: int, server_args: Sequence[str]) -> list[str]:
    """`server_args` are shell-split strings (`--server-arg='--threads 1'`), appended last."""
    extra = [token for value in server_args for token in shlex.split(value)]
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--model", model]
    return cmd + ["--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, *extra]


def start_server(
    cmd: list[str], log_path: Path, log: Log, name: str = "loom", extra_env: dict[str, str] | None = None
) -> Popen[bytes]:
    extra_env = extra_env or {}
    shown = " ".join(f"{key}={value}" for key, value in extra_env.items())
    log(f"{name}: starting {shown + ' ' if shown else ''}{shlex.join(cmd)} (log: {log_path})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
    with log_path.open("wb") as log_file:
        # A session of its own, so stop_server can reap any engine processes the server forks.
        return Popen(cmd, env=env, stdout=log_file, stderr=STDOUT, start_new_session=True)


def log_tail(log_path: Path, num_lines: int = 30) -> str:
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    return "\n".join(lines[-num_lines:])


# "Start to ready" is read off this poll: every 0.5 s, as before, added up to 0.5 s to a start of
# 0.5-1 s (llama-server's); a refused connection costs the starting server next to nothing.
HEALTH_POLL_S = 0.05


def wait_for_health(
    url: str, proc: Popen[bytes], timeout_s: float, log_path: Path, log: Log, name: str = "loom"
) -> float:
    """Poll `/health` until 200 (a peer answers 503 while it loads), failing early with the server
    log's tail if the process dies; returns the seconds it took."""
    start = time.monotonic()
    next_report = start + 5.0
    while True:
        if proc.poll() is not None:
            raise LoomBenchError(f"server exited with {proc.returncode}:\n{log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                ready_s = time.monotonic() - start
                log(f"{name}: healthy after {ready_s:.1f}s")
                return ready_s
        except httpx.TransportError:
            pass  # not listening yet
        now = time.monotonic()
        if now - start > timeout_s:
            raise LoomBenchError(f"no healthy /health after {timeout_s:.0f}s:\n{log_tail(log_path)}")
        if now >= next_report:
            log(f"{name}: waiting for {url}/health ({now - start:.0f}s)")
            next_report = now + 5.0
        time.sleep(HEALTH_POLL_S)


def stop_server(proc: Popen[bytes], log: Log, name: str = "loom") -> None:
    log(f"{name}: stopping server")
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except TimeoutExpired:
        proc.kill()
        proc.wait()
    # Leftover children would steal cores from whatever runs next; the process group is ours alone.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    log(f"{name}: server stopped (exit {proc.returncode})")
