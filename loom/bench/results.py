"""What one benchmark invocation found: a phase's numbers, a scenario's ratios, a target's run.

Owns the reduction of a phase's request records to its report (req/s, output and total tok/s,
TTFT / ITL / TPOT / end-to-end percentiles, the load average at its start and end) and the shape
of the JSON report (`asdict` of these). Never sends requests and never prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loom.bench.client import RequestRecord
from loom.bench.stats import Distribution, LoadAverage, summarize

MAX_ERROR_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class PhaseResult:
    target: str
    phase: str  # "c=8", "rate=2", "json-schema", ...
    concurrency: int | None  # at most this many in flight; None: unbounded (a request rate)
    request_rate: float | None  # Poisson arrivals per second; None: all sent at once
    num_requests: int
    num_ok: int
    wall_s: float
    output_tokens: int  # summed over the requests that succeeded
    prompt_tokens: int | None  # summed; None when the server reported no usage
    output_tok_s: float
    total_tok_s: float | None  # prompt + output tokens per second
    req_s: float  # successful requests per second
    ttft: Distribution | None
    itl: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    load_start: LoadAverage
    load_end: LoadAverage
    errors: tuple[str, ...] = ()  # the first few failures, as the server said them

    @property
    def mean_output_tokens(self) -> float:
        return self.output_tokens / self.num_ok if self.num_ok else 0.0


@dataclass(frozen=True, slots=True)
class PhaseShape:
    target: str
    phase: str
    concurrency: int | None = None
    request_rate: float | None = None


def summarize_phase(
    shape: PhaseShape, records: Sequence[RequestRecord], wall_s: float, load_start: LoadAverage, load_end: LoadAverage
) -> PhaseResult:
    ok = [r for r in records if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompts = [r.prompt_tokens for r in ok]
    prompt = sum(p for p in prompts if p is not None) if ok and None not in prompts else None
    return PhaseResult(
        target=shape.target, phase=shape.phase, concurrency=shape.concurrency, request_rate=shape.request_rate,
        num_requests=len(records), num_ok=len(ok), wall_s=wall_s, output_tokens=output, prompt_tokens=prompt,
        output_tok_s=output / wall_s if wall_s > 0 else 0.0,
        total_tok_s=(output + prompt) / wall_s if prompt is not None and wall_s > 0 else None,
        req_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft=summarize([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl=summarize([gap for r in ok for gap in r.itl_s]),
        tpot=summarize([t for r in ok if (t := r.tpot_s) is not None]),
        e2e=summarize([r.e2e_s for r in ok]),
        load_start=load_start, load_end=load_end,
        errors=tuple(str(r.error) for r in records if not r.ok)[:MAX_ERROR_EXAMPLES],
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    """One scenario on one target, as ratios to the plain run of the same target."""

    name: str
    target: str
    run: PhaseResult | None
    plain: PhaseResult | None  # the same target, same concurrency, no scenario fields
    values: dict[str, float | int | str | None] = field(default_factory=dict)  # ratios, counts, shares
    notes: tuple[str, ...] = ()
    more_runs: tuple[PhaseResult, ...] = ()  # further phases of the scenario (json-schema's long keys)
    examples: tuple[str, ...] = ()  # the first few answers, so a failed check can be read


@dataclass(slots=True)
class TargetRun:
    """Everything measured on one target, filled as its phases run; one entry of the JSON report."""

    name: str
    kind: str
    url: str | None = None
    command: tuple[str, ...] = ()
    ready_s: float | None = None  # process start -> healthy, for a server the bench started
    model_id: str | None = None
    phases: list[PhaseResult] = field(default_factory=list)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def plain_at(self, concurrency: int, num_requests: int) -> PhaseResult | None:
        """A plain phase (sweep level or scenario reference) of this shape that produced numbers."""
        for phase in self.phases:
            same_shape = phase.concurrency == concurrency and phase.num_requests == num_requests
            if same_shape and phase.request_rate is None and phase.num_ok:
                return phase
        return None

    @property
    def failed(self) -> bool:
        return bool(self.errors) or any(p.num_ok < p.num_requests for p in self.phases)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator
