"""`loom serve` as a user runs it: a separate process that prints its address once ready."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port

from loom.cli import resolve_dtype
from loom.models.native import native_kernels_expected

MODEL = "SmolLM2-135M-Instruct"
READY_TIMEOUT_S = 120.0


def tail(log: str, num_lines: int = 30) -> str:
    """The end of the server's stderr without the weight-loading progress bar."""
    lines = [line for line in log.replace("\r", "\n").splitlines() if line and "loading weights" not in line]
    return "\n".join(lines[-num_lines:])


def read_lines(stream: object, lines: queue.SimpleQueue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line)


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_prints_ready_answers_and_stops_cleanly(tmp_path: Path, stop_signal: signal.Signals) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "loom.cli",
        "serve",
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--dtype",
        "float32",
    ]
    cmd += ["--kv-cache-gib", "0.25"]
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=read_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        ready = wait_for_ready(proc, lines)
        assert f"http://127.0.0.1:{port}/v1" in ready
        assert MODEL in ready
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).json()
        assert models["data"][0]["max_model_len"] == 1024
    except BaseException:
        print(tail(stderr_path.read_text()), file=sys.stderr)
        raise
    finally:
        proc.send_signal(stop_signal)  # what `kill` and Ctrl-C send
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = stderr_path.read_text()
    assert "Application shutdown complete" in log, tail(log)
    assert "Traceback" not in log, tail(log)
    # uvicorn re-raises the signal it caught once it has shut down, so dying by it is normal
    assert proc.returncode in (0, -stop_signal, 128 + stop_signal), tail(log)


def wait_for_ready(proc: subprocess.Popen[str], lines: queue.SimpleQueue[str]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                raise AssertionError(f"loom serve exited with {proc.returncode} before ready; stdout: {seen}") from None
            continue
        seen.append(line)
        if "ready at" in line:
            return line
    raise AssertionError(f"no 'ready at' line within {READY_TIMEOUT_S} s; stdout: {seen}")


def test_serve_help_lists_the_options() -> None:
    loom = shutil.which("loom", path=str(Path(sys.executable).parent)) or shutil.which("loom")
    cmd = [loom] if loom else [sys.executable, "-m", "loom.cli"]
    out = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--max-model-len", "--model", "--dtype", "--port", "--kv-cache-gib", "--small-batch-rows"):
        assert option in out.stdout


def test_serve_names_a_missing_model_and_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.gguf"
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--no-platform", "--model", str(missing)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert f"no model at {missing}" in done.stderr and "Traceback" not in done.stderr


def test_serve_refuses_a_negative_small_batch_row_count() -> None:
    cmd = [sys.executable, "-m", "loom.cli", "serve", "--no-platform", "--small-batch-rows", "-1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "--small-batch-rows: must be 0 or more, not -1" in done.stderr, done.stderr


def test_auto_dtype_follows_the_cpu_and_the_native_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    assert resolve_dtype("float16") == "float16"
    monkeypatch.setenv("LOOM_NATIVE_KERNELS", "0")
    assert resolve_dtype("auto") == ("bfloat16" if capability.startswith("AVX512") else "float32")
    monkeypatch.delenv("LOOM_NATIVE_KERNELS")
    if capability == "AVX2" and native_kernels_expected():
        assert resolve_dtype("auto") == "bfloat16"
