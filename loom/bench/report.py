"""The benchmark's report: text tables, the JSON file and the PNG plot.

Owns the layout of the per-phase table (every target, every sweep level: req/s, tok/s, latency
percentiles, load average), the side-by-side comparison (each target's tok/s and TTFT p50 as a
ratio to the reference target), the scenario table, the JSON writing and the plot (throughput and
TTFT p50 against concurrency or request rate, one line per target). matplotlib is optional: without
it the plot is skipped with a reason, never an error. Never measures anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loom.bench.results import PhaseResult, ScenarioResult, TargetRun, ratio
from loom.bench.stats import Distribution

SWEEP_PREFIXES = ("c=", "rate=")


def sweep_phases(run: TargetRun) -> list[PhaseResult]:
    """The phases of the concurrency sweep or the request-rate sweep, not scenario references."""
    return [p for p in run.phases if p.phase.startswith(SWEEP_PREFIXES)]


def grid(rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns, a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def cell(value: float | str | None, fmt: str, scale: float = 1.0) -> str:
    if value is None or isinstance(value, str):
        return value or "-"
    return format(value * scale, fmt)


def _ms(dist: Distribution | None, attr: str) -> str:
    return cell(None if dist is None else getattr(dist, attr), ",.0f", 1e3)


def phase_row(p: PhaseResult) -> list[str]:
    return [
        p.target, p.phase, f"{p.num_ok}/{p.num_requests}", cell(p.req_s, ".2f"), cell(p.output_tok_s, ",.1f"),
        cell(p.total_tok_s, ",.1f"), cell(p.mean_output_tokens, ".0f"),
        "/".join(_ms(p.ttft, q) for q in ("p50", "p90", "p99")), "/".join(_ms(p.itl, q) for q in ("p50", "p99")),
        _ms(p.tpot, "p50"), "/".join(cell(None if p.e2e is None else getattr(p.e2e, q), ".2f") for q in ("p50", "p99")),
        f"{p.load_start.one:.2f}>{p.load_end.one:.2f}",
    ]  # fmt: skip


PHASE_HEADER = [
    "target", "phase", "ok", "req/s", "out tok/s", "total tok/s", "out/req", "TTFT p50/90/99 ms", "ITL p50/99 ms",
    "TPOT p50 ms", "E2E p50/99 s", "load 1m",
]  # fmt: skip


def phase_table(phases: Sequence[PhaseResult]) -> str:
    return grid([PHASE_HEADER] + [phase_row(p) for p in phases])


def _level(p: PhaseResult) -> str:
    return p.phase


def comparison_table(runs: Sequence[TargetRun], reference: str) -> str:
    """One row per sweep level: each target's output tok/s and TTFT p50, and both as ratios to the
    reference target's (a ratio above 1 in tok/s, below 1 in TTFT, means faster than the reference)."""
    by_target = {run.name: {_level(p): p for p in sweep_phases(run)} for run in runs}
    levels = list(dict.fromkeys(_level(p) for run in runs for p in sweep_phases(run)))
    others = [run.name for run in runs if run.name != reference]
    header = ["level"] + [f"{run.name} tok/s" for run in runs] + [f"{o}/{reference}" for o in others]
    header += [f"{run.name} TTFT p50 ms" for run in runs] + [f"{o}/{reference} TTFT" for o in others]
    rows = [header]
    for level in levels:
        got = {name: phases.get(level) for name, phases in by_target.items()}
        tps = {name: p.output_tok_s if p else None for name, p in got.items()}
        ttft = {name: p.ttft.p50 if p and p.ttft else None for name, p in got.items()}
        row = [level] + [cell(tps[run.name], ",.1f") for run in runs]
        row += [cell(ratio(tps[o], tps[reference]), ".2f") for o in others]
        row += [cell(ttft[run.name], ",.0f", 1e3) for run in runs]
        rows.append(row + [cell(ratio(ttft[o], ttft[reference]), ".2f") for o in others])
    return grid(rows)


def scenario_summary(s: ScenarioResult) -> str:
    v = s.values
    matched = (
        f"{cell(v.get('matched_ratio'), '.2f')}x a plain run of the same lengths "
        f"({cell(v.get('matched_plain_tok_s'), ',.1f')} tok/s); "
        if "matched_ratio" in v
        else ""
    )
    return matched + _scenario_checks(s)


def _scenario_checks(s: ScenarioResult) -> str:
    v = s.values
    if s.name == "json-schema":
        return (f"valid {v['valid']}/{v['requests']} ({v['validated_with']}), stop {v['finished_stop']}, "
                f"forced {cell(v.get('forced_tokens'), ',.0f')}/{v.get('output_tokens')} tokens; "
                f"long keys {cell(v['long_keys_req_s'], '.2f')} req/s, valid {v['long_keys_valid']}, "
                f"forced {cell(v.get('long_keys_forced_tokens'), ',.0f')}/{v.get('long_keys_output_tokens')} tokens")  # fmt: skip
    if s.name == "tools-required":
        share = cell(v["valid_share"], ".1%")
        return (f"calls valid {v['valid_calls']}/{v['calls']} = {share} ({v['validated_with']}); "
                f"{v['requests_with_calls']}/{v['requests']} requests called, finish tool_calls {v['finished_tool_calls']}, "
                f"calls cut by max_tokens {v.get('calls_cut_short', 0)}")  # fmt: skip
    if s.name == "prefix-cache":
        return (f"{v['system_prompt_tokens']}-token prompt: TTFT cold {cell(v['cold_ttft_s'], ',.0f', 1e3)} ms, "
                f"warm {cell(v['warm_ttft_s'], ',.0f', 1e3)} ms ({v['cached_tokens']} cached) = {cell(v['warm_speedup'], '.1f')}x")  # fmt: skip
    return ""


def scenario_table(scenarios: Sequence[ScenarioResult]) -> str:
    rows = [["target", "scenario", "out tok/s", "plain tok/s", "ratio", "req/s", "plain req/s", "load 1m", "checks"]]
    for s in scenarios:
        tps = None if s.run is None else s.run.output_tok_s
        plain_tps = None if s.plain is None else s.plain.output_tok_s
        rows.append([
            s.target, s.name, cell(tps, ",.1f"), cell(plain_tps, ",.1f"), cell(ratio(tps, plain_tps), ".2f"),
            cell(None if s.run is None else s.run.req_s, ".2f"), cell(None if s.plain is None else s.plain.req_s, ".2f"),
            f"{s.run.load_start.one:.2f}>{s.run.load_end.one:.2f}" if s.run else "-", scenario_summary(s),
        ])  # fmt: skip
    return grid(rows)


def fast_forward_lines(scenarios: Sequence[ScenarioResult]) -> list[str]:
    """Long-keys requests/s of targets with fast-forward (tokens forced) over those without (none)."""
    runs = [s for s in scenarios if s.name == "json-schema" and s.values.get("long_keys_forced_tokens") is not None]
    on = [s for s in runs if s.values["long_keys_forced_tokens"] > 0]
    off = [s for s in runs if s.values["long_keys_forced_tokens"] == 0]
    return [
        f"fast-forward: long keys {a.target} {cell(a.values['long_keys_req_s'], '.2f')} req/s vs {b.target} "
        f"{cell(b.values['long_keys_req_s'], '.2f')} req/s without = {cell(ratio(a.values['long_keys_req_s'], b.values['long_keys_req_s']), '.2f')}x"
        for a in on
        for b in off
    ]


def report_lines(runs: Sequence[TargetRun], reference: str) -> list[str]:
    lines = ["", phase_table([p for run in runs for p in run.phases])]
    if len(runs) > 1:
        lines += ["", comparison_table(runs, reference)]
    scenarios = [s for run in runs for s in run.scenarios]
    if scenarios:
        lines += ["", scenario_table(scenarios)]
        lines += [f"{s.target} {s.name}: {note}" for s in scenarios for note in s.notes]
        lines += fast_forward_lines(scenarios)
    for run in runs:
        if run.ready_s is not None:
            lines.append(f"{run.name}: start to ready {run.ready_s:.1f}s")
        lines += [f"{run.name}: {note}" for note in run.notes]
        lines += [f"{run.name}: ERROR {error}" for error in run.errors]
    return lines


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def runs_payload(runs: Sequence[TargetRun]) -> list[dict[str, Any]]:
    return [asdict(run) for run in runs]


def write_plot(path: Path, runs: Sequence[TargetRun], log: Callable[[str], None]) -> Path | None:
    """Output tok/s and TTFT p50 against concurrency (or request rate), one line per target;
    None, and a line saying why, when matplotlib is not installed or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: write the file only
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: matplotlib is not installed (pip install 'loom[bench]'): no PNG written")
        return None
    series = {run.name: sweep_phases(run) for run in runs if sweep_phases(run)}
    if not series:
        log("plot: no sweep phase produced numbers: no PNG written")
        return None
    by_rate = any(p.request_rate is not None for phases in series.values() for p in phases)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, phases in series.items():
        xs = [p.request_rate if by_rate else p.concurrency for p in phases]
        left.plot(xs, [p.output_tok_s for p in phases], marker="o", label=name)
        ttft = [(x, p.ttft.p50) for x, p in zip(xs, phases, strict=True) if p.ttft]
        if ttft:
            right.plot([x for x, _ in ttft], [t for _, t in ttft], marker="o", label=name)
    xlabel = "request rate (req/s)" if by_rate else "concurrent streams"
    levels = sorted({p.concurrency for phases in series.values() for p in phases if p.concurrency})
    for axes, ylabel in ((left, "output tokens/s"), (right, "TTFT p50 (s)")):
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:  # hf alone has no TTFT line
            axes.legend()
        axes.set_ylim(bottom=0)
        if not by_rate:
            axes.set_xscale("log", base=2)
            axes.set_xticks(levels, [str(level) for level in levels])  # 1, 8, 32 rather than 2^0, 2^3, 2^5
    fig.suptitle("loom bench")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
