"""`python -m loom.bench.burst`: does a burst of maximal requests leave the server's memory behind?

Starts a Loom server (or takes `--url` and `--server-pid`), warms it with ordinary requests and
takes its RSS once it is idle; then sends `--rounds` bursts of the largest requests the default
limits admit (and a few they refuse), all at once, and after each burst waits until the server is
idle again and takes its RSS. Prints idle, peak and after-burst RSS and the growth against idle.
Each kind of request in a burst:
- `long-prompt`: a prompt that fills the context but for 64 tokens (a prefill of the whole window);
- `body-4mib`: a user message just under the 4 MiB body limit (refused: it cannot fit the context);
- `body-over`: a body over the limit (413 while reading);
- `many-limits`: 760 messages (1,024 would overflow the default model's context), 32 stop strings of 256 characters, 1,024 `logit_bias` entries,
  256 `bad_words`, 20 `top_logprobs`;
- `n-64`: `n: 64` choices of 32 tokens;
- `big-schema`: a JSON schema of 200 properties near the 64 KiB text cap;
- `tools-128`: 128 tools and `tool_choice: "required"`.
A run passes when every allowed request succeeded, every refused one was a 4xx, and the RSS after
the last burst is within `--max-growth-pct` (5) of idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from loom.bench.server import free_port, server_command, start_server, stop_server, wait_for_health
from loom.bench.soak import process_rss_mb

_WORD = "lorem "
_MESSAGES = 760  # the limit is 1,024, but 1,024 templated messages overflow the default model's 8,192-token context


def burst_bodies(model: str, prompt_words: int) -> list[tuple[str, dict[str, Any], bool]]:
    """(kind, body, should succeed) for one burst."""
    base = {"model": model, "max_tokens": 32, "temperature": 0.7}
    long_prompt = _WORD * prompt_words
    schema = {
        "type": "object",
        "properties": {f"field_number_{i}_" + "x" * 200: {"type": "string", "maxLength": 8} for i in range(200)},
        "required": [f"field_number_{i}_" + "x" * 200 for i in range(3)],
    }
    tools = [
        {"type": "function", "function": {
            "name": f"tool_{i}",
            "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
        }}
        for i in range(128)
    ]  # fmt: skip
    many_messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(_MESSAGES - 1)]
    return [
        ("long-prompt", {**base, "messages": [{"role": "user", "content": long_prompt}]}, True),
        ("body-4mib", {**base, "messages": [{"role": "user", "content": "a " * (2_000_000 - 100)}]}, False),
        ("body-over", {**base, "messages": [{"role": "user", "content": "a" * (5 << 20)}]}, False),
        (
            "many-limits",
            {
                **base,
                "messages": [*many_messages, {"role": "user", "content": "Say something."}],
                "stop": [f"{i:03d}" + "s" * 253 for i in range(32)],
                "logit_bias": {str(i): 0.5 for i in range(1000, 2024)},
                "bad_words": [f"zq{i}xv" for i in range(256)],
                "logprobs": True,
                "top_logprobs": 20,
            },
            True,
        ),  # fmt: skip
        ("n-64", {**base, "messages": [{"role": "user", "content": "Name a colour."}], "n": 64}, True),
        (
            "big-schema",
            {
                **base,
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "Fill the form."}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "form", "schema": schema}},
            },
            True,
        ),  # fmt: skip
        (
            "tools-128",
            {
                **base,
                "messages": [{"role": "user", "content": "Call a tool."}],
                "tools": tools,
                "tool_choice": "required",
            },
            True,
        ),  # fmt: skip
    ]


async def _send(client: httpx.AsyncClient, kind: str, body: dict[str, Any], should_succeed: bool) -> str:
    try:
        response = await client.post(
            "/v1/chat/completions", content=json.dumps(body).encode(), headers={"content-type": "application/json"}
        )
    except httpx.HTTPError as exc:
        return f"{kind}: FAILED {type(exc).__name__}"
    ok = response.status_code == 200 if should_succeed else 400 <= response.status_code < 500
    return f"{kind}: {'ok' if ok else 'FAILED'} {response.status_code}"


async def _idle_rss(client: httpx.AsyncClient, pid: int | None, settle_s: float) -> float | None:
    """Waits until the engine runs and waits for nothing, then `settle_s` more; the RSS then."""
    while True:
        text = (await client.get("/metrics")).text
        busy = [
            line
            for line in text.splitlines()
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))
        ]
        if all(line.rsplit(" ", 1)[1] in ("0", "0.0") for line in busy):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(settle_s)
    return process_rss_mb(pid)


async def run_bursts(url: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.request_timeout, connect=10.0)) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model, context = card["id"], int(card.get("max_model_len") or 8192)
        sized = (await client.post("/tokenize", json={"model": model, "prompt": _WORD * 100})).json()["count"]
        prompt_words = int((context - 64 - 64) * 100 / sized)  # the template and the answer fit beside it
        warm = {"model": model, "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 16}
        await asyncio.gather(*(client.post("/v1/chat/completions", json=warm) for _ in range(8)))
        idle = await _idle_rss(client, pid, args.settle_s)
        print(f"burst: idle RSS {idle:,.1f} MB (model {model}, context {context} tokens)", flush=True)
        after: list[float | None] = []
        peak = idle or 0.0
        results: Counter[str] = Counter()
        for round_index in range(args.rounds):
            bodies = burst_bodies(model, prompt_words) * args.copies
            started = time.monotonic()
            sends = asyncio.gather(*(_send(client, kind, body, ok) for kind, body, ok in bodies))
            while not sends.done():
                peak = max(peak, process_rss_mb(pid) or 0.0)
                await asyncio.sleep(0.2)
            results.update(await sends)
            after.append(await _idle_rss(client, pid, args.settle_s))
            print(f"burst {round_index + 1}/{args.rounds}: {len(bodies)} requests in {time.monotonic() - started:.1f}s, "
                  f"peak {peak:,.1f} MB, idle after {after[-1]:,.1f} MB", flush=True)  # fmt: skip
    growth = None if idle is None or after[-1] is None else 100.0 * (after[-1] - idle) / idle
    failed = sorted(k for k in results if "FAILED" in k)
    return {
        "idle_mb": idle, "peak_mb": peak, "after_mb": after, "growth_pct": growth, "results": dict(results),
        "passed": not failed and growth is not None and growth <= args.max_growth_pct,
    }  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loom.bench.burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running Loom server (else one is started)")
    parser.add_argument("--server-pid", type=int, help="its pid, for RSS (with --url)")
    parser.add_argument("--model", default=None, help="GGUF for the server started here (default: the default model)")
    parser.add_argument("--server-arg", action="append", default=[], help="loom serve arguments (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts, each followed by an idle RSS sample")
    parser.add_argument("--copies", type=int, default=2, help="copies of each kind of request in one burst")
    parser.add_argument("--settle-s", type=float, default=5.0, help="idle seconds before an RSS sample")
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--max-growth-pct", type=float, default=5.0)
    parser.add_argument("--results-dir", default="loom-bench-results")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.url:
        report = asyncio.run(run_bursts(args.url.rstrip("/"), args.server_pid, args))
    else:
        from loom.bench.serve_bench import default_model_path

        port = free_port()
        log_path = results_dir / f"{stamp}-burst-server.log"
        cmd = server_command(args.model or default_model_path(), "auto", port, args.server_arg)
        proc = start_server(cmd, log_path, print)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for_health(url, proc, 600.0, log_path, print)
            report = asyncio.run(run_bursts(url, proc.pid, args))
        finally:
            stop_server(proc, print)
    for kind, count in sorted(report["results"].items()):
        print(f"  {kind}: {count}")
    growth = report["growth_pct"]
    print(f"burst: idle {report['idle_mb']:,.1f} MB, peak {report['peak_mb']:,.1f} MB, after "
          f"{report['after_mb'][-1]:,.1f} MB = {growth:+.1f}% of idle; load {Path('/proc/loadavg').read_text().split()[0]}")  # fmt: skip
    path = results_dir / f"{stamp}-burst.json"
    path.write_text(json.dumps({"args": vars(args), **report}, indent=2) + "\n")
    print(f"wrote {path}; {'passed' if report['passed'] else 'FAILED'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
