"""One measured phase: the load average before, the load itself with its live progress line, the
load average after, and the summary. The one place every sweep level and scenario goes through, so
each is measured the same way. Never decides what to send (`workload`, `scenarios` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx

from loom.bench.client import Progress, RequestRecord, run_load
from loom.bench.results import PhaseResult, PhaseShape, summarize_phase
from loom.bench.server import Log
from loom.bench.stats import read_loadavg


async def measure_phase(
    client: httpx.AsyncClient,
    shape: PhaseShape,
    bodies: Sequence[dict[str, Any]],
    log: Log,
    offsets: Sequence[float] | None = None,
) -> tuple[PhaseResult, list[RequestRecord]]:
    """Sends `bodies` with at most `shape.concurrency` in flight (None: no bound), each at its offset."""
    load_start = read_loadavg()
    log(f"{shape.target}: {shape.phase}: {len(bodies)} requests (load average {load_start})")
    progress = Progress(f"{shape.target} {shape.phase}", len(bodies))
    records, wall_s = await run_load(client, bodies, progress, shape.concurrency, offsets)
    result = summarize_phase(shape, records, wall_s, load_start, read_loadavg())
    ttft = f"TTFT p50 {result.ttft.p50 * 1e3:,.0f} ms" if result.ttft else "no TTFT"
    log(
        f"{shape.target}: {shape.phase}: {result.output_tok_s:,.1f} output tok/s, {result.req_s:.2f} req/s, "
        f"{ttft}, {result.num_ok}/{result.num_requests} ok in {wall_s:.1f}s (load average {result.load_end})"
    )
    for error in result.errors:
        log(f"{shape.target}: {shape.phase}: failed: {error}")
    return result, records
