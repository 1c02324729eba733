"""One benchmark invocation: every target in turn, never two at once, each through the same phases.

Owns the plan (targets, the seeded workload, the concurrency sweep or the request-rate sweep,
the scenarios and where they run) and the order of work on one target: start it (or take its
URL), warm it up with one short request, run each sweep level, run the scenarios, stop it. Phase
`k` of the sweep uses the same prompts on every target and prompts of its own, unshared with any
other phase. A target that fails is recorded with its error and the next one still runs. Never
formats the report (`report` does).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

import httpx

from loom.bench import llama_server, vllm_setup
from loom.bench.client import stream_chat
from loom.bench.phase import measure_phase
from loom.bench.results import PhaseResult, PhaseShape, TargetRun
from loom.bench.scenarios import RUNNERS, ScenarioContext
from loom.bench.server import Log, LoomBenchError
from loom.bench.stats import read_loadavg, summarize
from loom.bench.targets import VLLM_SETUP_HINT, LaunchSettings, TargetSpec, running, vllm_python
from loom.bench.workload import BenchRequest, Tokenizer, WorkloadSpec, arrival_offsets, build_requests, chat_body

PHASE_INDEX_STRIDE = 100_000  # phase k's prompts are numbered from (k + 1) * stride: never shared
DEFAULT_RATE_REQUESTS = 32


@dataclass(frozen=True, slots=True)
class BenchPlan:
    targets: tuple[TargetSpec, ...]
    workload: WorkloadSpec
    levels: tuple[int, ...] = (1, 8, 32)  # the concurrency sweep
    rates: tuple[float, ...] = ()  # the request-rate sweep instead, when given
    num_requests: int | None = None  # per phase; None: one per stream (sweep) or 32 (rates)
    max_concurrency: int | None = None  # with rates: at most this many in flight
    scenarios: tuple[str, ...] = ()
    scenario_targets: tuple[str, ...] = ()  # empty: every HTTP target
    scenario_concurrency: int = 32
    request_timeout_s: float = 600.0


@dataclass(frozen=True, slots=True)
class SweepPhase:
    shape: PhaseShape
    requests: tuple[BenchRequest, ...]
    offsets: tuple[float, ...] | None  # Poisson send times; None: as fast as the concurrency allows


def sweep(plan: BenchPlan, target: str, tokenizer: Tokenizer | None) -> list[SweepPhase]:
    phases = []
    if plan.rates:
        count = plan.num_requests or DEFAULT_RATE_REQUESTS
        for k, rate in enumerate(plan.rates):
            shape = PhaseShape(target, f"rate={rate:g}", plan.max_concurrency, rate)
            requests = build_requests(plan.workload, count, (k + 1) * PHASE_INDEX_STRIDE, tokenizer)
            offsets = arrival_offsets(count, rate, plan.workload.seed + k)
            phases.append(SweepPhase(shape, tuple(requests), tuple(offsets)))
        return phases
    for k, level in enumerate(plan.levels):
        requests = build_requests(plan.workload, plan.num_requests or level, (k + 1) * PHASE_INDEX_STRIDE, tokenizer)
        phases.append(SweepPhase(PhaseShape(target, f"c={level}", level), tuple(requests), None))
    return phases


def _client(plan: BenchPlan, url: str) -> httpx.AsyncClient:
    widest = max([*plan.levels, plan.scenario_concurrency, plan.max_concurrency or 0, plan.num_requests or 0])
    limits = httpx.Limits(max_connections=widest + 8, max_keepalive_connections=widest + 8)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(plan.request_timeout_s, connect=10.0))


async def fetch_model_id(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    if response.status_code != 200:
        raise LoomBenchError(f"GET /v1/models answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["data"][0]["id"])


async def measure_target(url: str, plan: BenchPlan, tokenizer: Tokenizer | None, run: TargetRun, log: Log) -> None:
    async with _client(plan, url) as client:
        run.model_id = model_id = await fetch_model_id(client)
        log(f"{run.name}: model id {model_id!r}; warm-up (1 request, 8 tokens)")
        warm = await stream_chat(client, chat_body(model_id, BenchRequest(0, "Hello, how are you?", 8), plan.workload))
        if not warm.ok:
            raise LoomBenchError(f"warm-up failed: {warm.error}")
        for phase in sweep(plan, run.name, tokenizer):
            bodies = [chat_body(model_id, request, plan.workload) for request in phase.requests]
            result, _ = await measure_phase(client, phase.shape, bodies, log, phase.offsets)
            run.phases.append(result)
        if plan.scenarios and (not plan.scenario_targets or run.name in plan.scenario_targets):
            ctx = ScenarioContext(client, run, model_id, plan.workload, plan.scenario_concurrency, tokenizer, log)
            for name in plan.scenarios:
                try:
                    run.scenarios.append(await RUNNERS[name](ctx))
                except (httpx.HTTPError, LoomBenchError, KeyError, ValueError) as exc:
                    run.errors.append(f"scenario {name}: {failure_text(exc)}")
                    log(f"{run.name}: scenario {name} FAILED: {run.errors[-1]}")


def failure_text(exc: Exception) -> str:
    """An exception as one line; an HTTP error status with the server's own message, which says why."""
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        try:
            error = response.json().get("error")
            message = error.get("message") if isinstance(error, dict) else error
        except (ValueError, AttributeError):
            message = None
        said = str(message) if message else response.text
        return f"HTTP {response.status_code} from {exc.request.url.path}: {' '.join(said.split())[:300]}"
    return f"{type(exc).__name__}: {exc}"


# What ends one target's run with its error recorded, while the other targets still run.
TARGET_FAILURES = (
    LoomBenchError, llama_server.BuildError, vllm_setup.SetupError, httpx.HTTPError, KeyError, ValueError, OSError
)  # fmt: skip


def run_http_target(
    spec: TargetSpec, plan: BenchPlan, launch: LaunchSettings, tokenizer: Tokenizer | None, log: Log
) -> TargetRun:
    run = TargetRun(spec.name, spec.kind, spec.url)
    log(f"== {spec.name} ({spec.kind}) == load average {read_loadavg()}")
    if spec.kind == "vllm" and vllm_python(launch) is None:
        run.notes.append(f"skipped: no vLLM virtual environment; {VLLM_SETUP_HINT}")
        log(f"{spec.name}: {run.notes[-1]}")
        return run
    if spec.kind == "vllm":
        # vLLM 0.32's CPU build kills its engine ("CPU Generator does not use offset") when a
        # seeded request's prefill is split across steps, so its requests draw unseeded.
        plan = dataclasses.replace(plan, workload=dataclasses.replace(plan.workload, request_seeds=False))
        run.notes.append("requests sent without `seed`: vLLM's CPU build fails seeded requests under chunked prefill")
    try:
        with running(spec, launch, log) as launched:
            run.url, run.ready_s, run.command = launched.url, launched.ready_s, launched.command
            asyncio.run(measure_target(launched.url, plan, tokenizer, run, log))
    except TARGET_FAILURES as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
        log(f"{spec.name}: FAILED: {run.errors[-1]}")
    return run


@dataclass(frozen=True, slots=True)
class HFOptions:
    model: str
    dtype: str
    threads: int


def run_hf_target(spec: TargetSpec, plan: BenchPlan, options: HFOptions, tokenizer: Any, log: Log) -> TargetRun:
    """transformers `generate` on the same prompts, one batch per sweep level (no HTTP, no TTFT)."""
    run = TargetRun(spec.name, spec.kind)
    log(f"== {spec.name} (transformers generate) == load average {read_loadavg()}")
    if tokenizer is None:
        run.errors.append(f"no GGUF file at {options.model}")
        return run
    if plan.rates:
        run.notes.append("skipped: transformers generate has no request rate, only batches")
        return run
    from loom.bench import hf_baseline  # torch and transformers: only when this peer runs

    w = plan.workload
    settings = hf_baseline.HFSettings(
        options.model, options.dtype, options.threads, w.max_tokens, w.temperature, w.top_p
    )
    phases = sweep(plan, spec.name, tokenizer)
    batches = [[r.prompt for r in phase.requests[: phase.shape.concurrency]] for phase in phases]
    try:
        results = hf_baseline.run_hf(settings, tokenizer, batches, log)
    except (RuntimeError, OSError, ValueError) as exc:
        run.errors.append(f"{type(exc).__name__}: {exc}")
        log(f"{spec.name}: FAILED: {run.errors[-1]}")
        return run
    run.phases += [hf_phase_result(phase.shape, hf) for phase, hf in zip(phases, results, strict=True)]
    return run


def hf_phase_result(shape: PhaseShape, hf: Any) -> PhaseResult:
    return PhaseResult(
        target=shape.target, phase=shape.phase, concurrency=shape.concurrency, request_rate=None,
        num_requests=hf.batch_size, num_ok=hf.batch_size, wall_s=hf.wall_s, output_tokens=hf.completion_tokens,
        prompt_tokens=hf.prompt_tokens, output_tok_s=hf.tokens_per_s,
        total_tok_s=(hf.completion_tokens + hf.prompt_tokens) / hf.wall_s, req_s=hf.batch_size / hf.wall_s,
        ttft=None, itl=None, tpot=None, e2e=summarize([hf.wall_s] * hf.batch_size),
        load_start=hf.load_start, load_end=hf.load_end,
    )  # fmt: skip
