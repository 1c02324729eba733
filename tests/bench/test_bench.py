"""`loom bench` without a model: its statistics, the seeded request set, and whole invocations against a
toy OpenAI-compatible server (streams N tokens, answers tool calls and JSON, some of them invalid on
purpose) and against Loom's real app on the toy engine, down to the JSON report and the plot."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from test_soak import serve_toy
from toy_engine import ToyEngine

from loom.bench import report, serve_bench
from loom.bench.burst import burst_bodies
from loom.bench.client import Progress, api_root
from loom.bench.llama_server import needs_no_repack
from loom.bench.report import fast_forward_lines
from loom.bench.results import ScenarioResult
from loom.bench.runner import failure_text
from loom.bench.scenarios import fast_forward_switch
from loom.bench.stats import parse_loadavg, percentile, summarize
from loom.bench.targets import LaunchSettings, llama_server_command, managed_command, parse_target
from loom.bench.workload import WorkloadSpec, arrival_offsets, build_request, build_requests, chat_body

BAD_EVERY = 4  # the toy answers request i with an invalid JSON / tool call when i % 4 == 0 / 1


def _instance(schema: dict[str, Any]) -> dict[str, Any]:
    """A valid value of the bench's flat schemas."""
    values = {"string": "x", "integer": None, "boolean": True, "array": ["k"]}
    out = {}
    for key, prop in schema["properties"].items():
        out[key] = prop.get("minimum", 1) if prop["type"] == "integer" else values[prop["type"]]
    return out


def _request_index(body: dict[str, Any]) -> int:
    head = body["messages"][-1]["content"].split(":", 1)[0]
    return int(head.removeprefix("Request ")) if head.startswith("Request ") else 2  # the warm-up


def _toy_deltas(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    index = _request_index(body)
    if "tools" in body:
        args = '{"city": 5}' if index % BAD_EVERY == 1 else '{"city": "Paris", "unit": "celsius"}'
        first = {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather"}}]}
        parts = [args[i : i + 5] for i in range(0, len(args), 5)]
        return [first] + [{"tool_calls": [{"index": 0, "function": {"arguments": p}}]} for p in parts], "tool_calls"
    if "response_format" in body:
        fmt = body["response_format"]["json_schema"]
        text = json.dumps(_instance(fmt["schema"])) if index % BAD_EVERY else '{"title": 1}'
        return [{"content": text[i : i + 4]} for i in range(0, len(text), 4)], "stop"
    return [{"content": f"t{i} "} for i in range(body["max_tokens"])], "length"


def toy_openai_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "toy-openai", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        deltas, finish = _toy_deltas(body)

        async def events() -> AsyncIterator[str]:
            for i, delta in enumerate(deltas):
                await asyncio.sleep(0.003)
                done = finish if i == len(deltas) - 1 else None
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta, 'finish_reason': done}]})}\n\n"
            usage = {"prompt_tokens": len(body["messages"][-1]["content"].split()), "completion_tokens": len(deltas)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def openai_url() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(toy_openai_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def loom_toy_url() -> Iterator[str]:
    yield from serve_toy(ToyEngine(max_model_len=4096))


class WordTokenizer:
    """One token per word, ids given as words are first seen."""

    def __init__(self) -> None:
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        for word in text.split():
            if word not in self.words:
                self.words.append(word)
        return [self.words.index(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_percentiles_match_numpy_linear_interpolation() -> None:
    values = [0.9, 0.1, 0.5, 2.0, 0.3, 0.7, 1.1]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    dist = summarize(values)
    assert dist is not None and dist.count == 7 and dist.mean == pytest.approx(np.mean(values))
    assert (dist.p50, dist.p90, dist.p99) == pytest.approx(tuple(np.percentile(values, [50, 90, 99])))
    assert summarize([]) is None and percentile([3.0], 99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)
    assert str(parse_loadavg("0.52 0.58 0.61 1/467 12345")) == "0.52 0.58 0.61"


def test_the_request_set_is_seeded_unique_and_independent_of_its_size() -> None:
    spec = WorkloadSpec(prompt_tokens=20, max_tokens=40, length_jitter=0.25, seed=3)
    tok = WordTokenizer()
    first = build_requests(spec, 8, 100, tok)
    assert first == build_requests(spec, 8, 100, tok)
    assert first[5] == build_request(spec, 105, tok) == build_requests(spec, 20, 100, tok)[5]
    assert first != build_requests(WorkloadSpec(20, 40, 0.25, seed=4), 8, 100, tok)
    assert len({r.prompt for r in first}) == 8 and all(r.prompt.startswith(f"Request {r.index}:") for r in first)
    assert all(15 <= len(tok.encode(r.prompt)) <= 25 and 30 <= r.max_tokens <= 50 for r in first)
    fixed = build_requests(WorkloadSpec(prompt_tokens=20, max_tokens=40), 4, 0, tok)
    assert {len(tok.encode(r.prompt)) for r in fixed} == {20} and {r.max_tokens for r in fixed} == {40}
    body = chat_body("m", fixed[0], WorkloadSpec(temperature=0.8, top_p=0.9, ignore_eos=False))
    assert body["temperature"] == 0.8 and body["top_p"] == 0.9 and "ignore_eos" not in body and body["stream"]
    assert body["seed"] == fixed[0].index and "seed" not in chat_body("m", fixed[0], WorkloadSpec(request_seeds=False))
    offsets = arrival_offsets(2000, 50.0, seed=1)
    assert offsets == arrival_offsets(2000, 50.0, seed=1) and offsets == sorted(offsets) and offsets[0] == 0
    assert offsets[-1] / 1999 == pytest.approx(1 / 50, rel=0.1)  # mean gap of a Poisson process at 50/s
    assert arrival_offsets(3, None) == [0.0, 0.0, 0.0]


def test_targets_peer_flags_and_the_fast_forward_probe() -> None:
    assert parse_target("peer=http://10.0.0.2:8080/v1/").url == "http://10.0.0.2:8080"
    assert parse_target("llama-server").kind == "llama-server"
    noff = parse_target("noff=loom:--no-grammar-fast-forward --threads 2")
    assert (noff.name, noff.kind, noff.args) == ("noff", "loom", ("--no-grammar-fast-forward --threads 2",))
    assert parse_target("again=loom").args == ()
    for bad in ("nope", "x=ftp://host", "=http://h"):
        with pytest.raises(Exception, match="expected|unknown"):
            parse_target(bad)
    assert api_root("http://h:1/") == "http://h:1"
    assert needs_no_repack(frozenset({"avx2", "amx_tile"})) and not needs_no_repack(frozenset({"avx512f"}))
    assert fast_forward_switch("  --structured-outputs-fast-forward  skip forced tokens") is not None
    assert fast_forward_switch("  --max-num-seqs N\n  --dtype D") is None
    settings = LaunchSettings(
        "m.gguf", "auto", Path("r"), "s", 10.0, Path("c"), llama_threads=2, llama_args=("--jinja",)
    )
    cmd = llama_server_command(Path("/x/llama-server"), settings, 8080)
    assert " ".join(cmd[1:]).startswith("-m m.gguf --host 127.0.0.1 --port 8080 -t 2 -np 64 -c 32768")
    loom_cmd = managed_command(noff, settings, 8081, print)
    assert loom_cmd[-3:] == ["--no-grammar-fast-forward", "--threads", "2"]
    assert ("--no-repack" in cmd) == needs_no_repack() and cmd[-1] == "--jinja"


def test_a_missing_vllm_environment_skips_that_target_with_a_note(tmp_path: Path) -> None:
    argv = ["--target", "vllm", "--vllm-venv", str(tmp_path / "none"), "--skip-extras", "--no-plot"]
    [vllm] = _run(argv, tmp_path)["targets"]
    assert not vllm["phases"] and not vllm["errors"] and "no vLLM virtual environment" in vllm["notes"][0]


def test_progress_line_counts_and_rewrites_itself_only_on_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("loom c=8", 8, out=out, done=3, failed=1, tokens=120)
    progress.show()
    progress.show(final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[loom c=8] 3/8 done, 1 failed, 120 tokens")


def _run(argv: list[str], tmp_path: Path) -> dict[str, Any]:
    assert serve_bench.main([*argv, "--model", str(tmp_path / "no.gguf"), "--results-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("*.json")
    return json.loads(path.read_text())


def test_two_targets_sweep_scenarios_json_and_plot(openai_url: str, tmp_path: Path) -> None:
    argv = [
        "--target", f"a={openai_url}", "--target", f"b={openai_url}", "--concurrency", "1,4", "--max-tokens", "6",
        "--prompt-tokens", "8", "--scenario", "json-schema", "--scenario", "tools-required", "--scenario", "penalties",
        "--scenario-target", "a", "--scenario-concurrency", "4",
    ]  # fmt: skip
    result = _run(argv, tmp_path)
    a, b = result["targets"]
    assert [p["phase"] for p in b["phases"]] == ["c=1", "c=4"] and not b["scenarios"]
    for phase in a["phases"][:2]:
        assert phase["num_ok"] == phase["num_requests"] == phase["concurrency"]
        assert phase["output_tokens"] == 6 * phase["num_ok"] and phase["output_tok_s"] > 0 and phase["req_s"] > 0
        assert phase["ttft"]["p50"] <= phase["ttft"]["p99"] <= phase["e2e"]["p99"]
        assert phase["itl"]["count"] == 5 * phase["num_ok"] and phase["tpot"]["p50"] > 0
        assert phase["load_start"]["one"] >= 0 and phase["load_end"]["one"] >= 0
    assert len(a["phases"]) == 2  # the sweep's c=4 is the scenarios' plain reference: no extra run
    scenarios = {s["name"]: s for s in a["scenarios"]}
    js = scenarios["json-schema"]["values"]
    assert (js["requests"], js["valid"], js["long_keys_valid"]) == (4, 3, 3)  # index 2,100,000 % 4 == 0 is invalid
    tools = scenarios["tools-required"]["values"]
    assert (tools["calls"], tools["valid_calls"], tools["valid_share"], tools["finished_tool_calls"]) == (4, 3, 0.75, 4)
    assert scenarios["penalties"]["values"]["output_tok_s_ratio"] > 0
    for name in ("json-schema", "tools-required"):  # a plain run of the same lengths beside each constrained one
        matched = scenarios[name]["more_runs"][-1]
        assert matched["phase"].endswith("matched plain") and scenarios[name]["values"]["matched_ratio"] > 0
        assert matched["output_tokens"] == scenarios[name]["run"]["output_tokens"]
    assert all(s["plain"] == a["phases"][1] for s in scenarios.values())
    assert "not available" not in " ".join(scenarios["json-schema"]["notes"])  # a URL target: switch unknown
    assert result["reference"] == "b" and result["workload"]["temperature"] == 0.8
    if _has_matplotlib():
        assert Path(result["plot"]).stat().st_size > 1000
    else:
        assert result["plot"] is None


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_without_matplotlib_the_plot_is_skipped_and_said(
    openai_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = _run(["--target", f"a={openai_url}", "--concurrency", "2", "--max-tokens", "3", "--skip-extras"], tmp_path)
    assert result["plot"] is None and not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert report.write_plot(tmp_path / "x.png", [], lambda line: None) is None


def test_request_rate_phases_and_loom_s_own_stream_format(openai_url: str, loom_toy_url: str, tmp_path: Path) -> None:
    argv = [
        "--target", f"toy={openai_url}", "--target", f"loom={loom_toy_url}", "--request-rate", "40,80",
        "--num-requests", "6", "--max-tokens", "2", "--skip-extras", "--no-plot",
    ]  # fmt: skip
    toy, loom = _run(argv, tmp_path)["targets"]
    assert [(p["phase"], p["request_rate"], p["num_requests"]) for p in toy["phases"]] == [
        ("rate=40", 40.0, 6), ("rate=80", 80.0, 6)
    ]  # fmt: skip
    assert loom["model_id"] == "toy" and all(p["num_ok"] == 6 and p["output_tokens"] == 6 for p in loom["phases"])
    assert all(p["prompt_tokens"] > 0 and p["total_tok_s"] > p["output_tok_s"] for p in loom["phases"])


def test_a_target_that_fails_is_reported_and_the_next_still_runs(openai_url: str, tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    argv = ["--target", f"dead={dead}", "--target", f"a={openai_url}", "--concurrency", "1", "--max-tokens", "2"]
    argv += ["--skip-extras", "--no-plot", "--model", str(tmp_path / "no.gguf"), "--results-dir", str(tmp_path)]
    assert serve_bench.main(argv) == 1
    dead_run, alive = json.loads(next(tmp_path.glob("*.json")).read_text())["targets"]
    assert dead_run["errors"] and not dead_run["phases"] and alive["phases"][0]["num_ok"] == 1


def test_default_targets_keep_the_old_flags() -> None:
    args = serve_bench.parse_args(["--url", "http://h:1", "--skip-hf"])
    assert [(t.name, t.kind, t.url) for t in serve_bench.targets_from_args(args)] == [("loom", "url", "http://h:1")]
    plan = serve_bench.plan_from_args(serve_bench.parse_args([]))
    assert [t.name for t in plan.targets] == ["loom", "hf"] and plan.scenarios == ("penalties", "prefix-cache")
    assert plan.levels == (1, 8, 32) and plan.workload.ignore_eos


def test_fast_forward_is_compared_across_targets_by_their_forced_tokens() -> None:
    def json_schema(target: str, req_s: float, forced: int | None) -> ScenarioResult:
        values = {"long_keys_req_s": req_s, "long_keys_forced_tokens": forced}
        return ScenarioResult("json-schema", target, None, None, dict(values))

    lines = fast_forward_lines(
        [json_schema("loom", 3.0, 420), json_schema("noff", 2.0, 0), json_schema("x", 1.0, None)]
    )
    assert lines == ["fast-forward: long keys loom 3.00 req/s vs noff 2.00 req/s without = 1.50x"]


def test_a_burst_holds_each_maximal_request_once_and_sizes_them_at_the_limits() -> None:
    bodies = {kind: (body, ok) for kind, body, ok in burst_bodies("m", prompt_words=100)}
    assert set(bodies) == {"long-prompt", "body-4mib", "body-over", "many-limits", "n-64", "big-schema", "tools-128"}
    sizes = {kind: len(json.dumps(body).encode()) for kind, (body, _) in bodies.items()}
    assert 3 << 20 < sizes["body-4mib"] < 4 << 20 < sizes["body-over"]
    many = bodies["many-limits"][0]
    counts = (len(many["messages"]), len(many["stop"]), len(many["logit_bias"]), len(many["bad_words"]))
    assert counts == (760, 32, 1024, 256)
    assert all(len(stop) == 256 for stop in many["stop"]) and len(bodies["tools-128"][0]["tools"]) == 128
    assert [kind for kind, (_, ok) in bodies.items() if not ok] == ["body-4mib", "body-over"]


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (
            {"error": {"code": 400, "message": "the request exceeds the available context size"}},
            "exceeds the available",
        ),
        ({"error": "plain\nstring"}, "plain string"),
        ("upstream  went\naway", "upstream went away"),
    ],
)
def test_a_failed_scenario_says_what_the_server_said(body: object, said: str) -> None:
    request = httpx.Request("POST", "http://peer/v1/chat/completions")
    response = (
        httpx.Response(400, json=body, request=request)
        if isinstance(body, dict)
        else httpx.Response(400, text=str(body), request=request)
    )
    exc = httpx.HTTPStatusError("400 Bad Request", request=request, response=response)
    assert failure_text(exc).startswith("HTTP 400 from /v1/chat/completions: ") and said in failure_text(exc)
    assert failure_text(ValueError("bad")) == "ValueError: bad"
