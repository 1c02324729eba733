"""What `loom bench` measures: the targets named on its command line, and the servers it starts.

Owns the `--target` grammar (`NAME=URL` for any OpenAI-compatible server already running, or a
kind the bench starts itself: `loom`, `llama-server`, `vllm`, and `hf`, which is no server but
`transformers` `generate` in this process), the command line of each managed server (the same
GGUF for all; llama-server from the cache `llama_server` builds, vLLM from its own virtual
environment), and the start -> ready -> stop of one at a time. Never measures anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loom.bench import llama_server, vllm_setup
from loom.bench.client import api_root
from loom.bench.server import Log, LoomBenchError, free_port, server_command, start_server, stop_server, wait_for_health

MANAGED_KINDS = ("loom", "llama-server", "vllm", "hf")
VLLM_MEMORY_SHARE = 0.3
VLLM_SETUP_HINT = "`loom bench --setup vllm` creates it (or pass --vllm-venv)"
URL_KIND = "url"


@dataclass(frozen=True, slots=True)
class TargetSpec:
    name: str
    kind: str  # one of MANAGED_KINDS, or URL_KIND for a server someone else runs
    url: str | None = None
    args: tuple[str, ...] = ()  # a managed loom target's own `loom serve` arguments, shell-quoted strings

    @property
    def is_http(self) -> bool:
        return self.kind != "hf"


def parse_target(text: str) -> TargetSpec:
    """`loom`, `llama-server`, `vllm`, `hf`, `NAME=URL` (`peer=http://10.0.0.2:8080/v1`), or
    `NAME=loom:ARGS`, a second managed Loom with its own serve arguments (`noff=loom:--no-grammar-fast-forward`)."""
    name, sep, url = text.partition("=")
    kind, colon, args = url.partition(":")
    if sep and kind == "loom":
        if not name:
            raise argparse.ArgumentTypeError(f"expected NAME=loom:ARGS, got {text!r}")
        return TargetSpec(name, "loom", args=(args,) if colon else ())
    if sep:
        if not name or not url.startswith(("http://", "https://")):
            raise argparse.ArgumentTypeError(f"expected NAME=http://host:port, got {text!r}")
        return TargetSpec(name, URL_KIND, api_root(url))
    if text not in MANAGED_KINDS:
        raise argparse.ArgumentTypeError(f"unknown target {text!r}: one of {', '.join(MANAGED_KINDS)} or NAME=URL")
    return TargetSpec(text, text)


@dataclass(frozen=True, slots=True)
class LaunchSettings:
    model: str  # the GGUF every managed server loads
    dtype: str  # loom serve --dtype
    results_dir: Path
    stamp: str
    startup_timeout_s: float
    cache_dir: Path
    loom_args: tuple[str, ...] = ()
    llama_args: tuple[str, ...] = ()
    llama_threads: int = os.cpu_count() or 1
    llama_parallel: int = 64
    llama_context: int = 32768
    vllm_venv: Path | None = None
    vllm_model: str | None = None  # vLLM wants a Hugging Face folder; None: the GGUF exported to one
    vllm_args: tuple[str, ...] = ()
    vllm_threads: int = os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class Launched:
    url: str
    ready_s: float | None  # process start -> healthy; None for a server the bench did not start
    command: tuple[str, ...] = ()
    pid: int | None = None


def _split(values: Sequence[str]) -> list[str]:
    return [token for value in values for token in shlex.split(value)]


def llama_server_command(binary: Path, settings: LaunchSettings, port: int) -> list[str]:
    cmd = [str(binary), "-m", settings.model, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(settings.llama_threads), "-np", str(settings.llama_parallel), "-c", str(settings.llama_context)]
    if llama_server.needs_no_repack():
        cmd.append("--no-repack")
    return cmd + _split(settings.llama_args)


def vllm_python(settings: LaunchSettings) -> Path | None:
    return vllm_setup.venv_python(settings.vllm_venv or vllm_setup.venv_dir(settings.cache_dir))


def vllm_command(python: Path, model: str, settings: LaunchSettings, port: int) -> list[str]:
    # The package's `vllm` console script is broken in the CPU build; the module entry point works.
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16"]
    # On the CPU this is the share of host memory vLLM reserves; its default (0.92) refuses to
    # start beside anything else. `--vllm-arg` comes after, so a user's own value wins.
    cmd += ["--gpu-memory-utilization", str(VLLM_MEMORY_SHARE)]
    return cmd + _split(settings.vllm_args)


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's CPU build binds its OpenMP threads and by default keeps one core for its front end:
    bind all `threads` cores, as Loom and llama-server use them."""
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "HF_HUB_OFFLINE": "1"}


def managed_command(spec: TargetSpec, settings: LaunchSettings, port: int, log: Log) -> list[str]:
    if spec.kind == "loom":
        return server_command(settings.model, settings.dtype, port, (*settings.loom_args, *spec.args))
    if spec.kind == "llama-server":
        return llama_server_command(llama_server.ensure(settings.cache_dir, log), settings, port)
    if spec.kind == "vllm":
        python = vllm_python(settings)
        if python is None:
            raise LoomBenchError(f"no vLLM virtual environment: {VLLM_SETUP_HINT}")
        model = settings.vllm_model
        if model is None:
            gguf = Path(settings.model)
            model = str(vllm_setup.export_model(gguf, vllm_setup.model_dir(settings.cache_dir, gguf), log))
        return vllm_command(python, model, settings, port)
    raise LoomBenchError(f"{spec.kind} is not a server")


@contextlib.contextmanager
def running(spec: TargetSpec, settings: LaunchSettings, log: Log) -> Iterator[Launched]:
    """The target's URL while it runs: a URL target as given, a managed one started here, healthy,
    and stopped (its whole process group) when the block ends, whatever happened inside."""
    if spec.url is not None:  # a URL target: someone else runs it
        yield Launched(spec.url, None)
        return
    port = free_port()
    cmd = managed_command(spec, settings, port, log)
    log_path = settings.results_dir / f"{settings.stamp}-{spec.name}-server.log"
    env = vllm_env(settings.vllm_threads) if spec.kind == "vllm" else None
    proc = start_server(cmd, log_path, log, spec.name, env)
    try:
        url = f"http://127.0.0.1:{port}"
        ready_s = wait_for_health(url, proc, settings.startup_timeout_s, log_path, log, spec.name)
        yield Launched(url, ready_s, tuple(cmd), proc.pid)
    finally:
        stop_server(proc, log, spec.name)
