"""Scenarios run on a target beside its plain sweep, each reported as a ratio to the plain run.

- `json-schema`: C streams each with a JSON-schema `response_format`; output tok/s as a ratio,
  and how many outputs parse and validate (`jsonschema`). Then a schema of long fixed keys for
  requests/s, run with the server's grammar fast-forward on and off where `loom serve --help`
  shows a switch for it (today it shows none, and the report says so).
- `tools-required`: C streams with `tool_choice: "required"` over two functions; output tok/s as
  a ratio, and the share of calls whose arguments validate against the function's `parameters`.
- `penalties`: C streams with presence/frequency/repetition penalties, logit_bias and logprobs.
- `prefix-cache`: TTFT behind a ~1,000-token system prompt, cold vs warm.
The plain reference is the sweep's phase at the same concurrency, or a plain run made here.
Never starts servers; `jsonschema` is optional (without it outputs are only parsed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from loom.bench import extras
from loom.bench.client import RequestRecord
from loom.bench.phase import measure_phase
from loom.bench.results import PhaseResult, PhaseShape, ScenarioResult, TargetRun, ratio
from loom.bench.server import Log
from loom.bench.workload import BenchRequest, Tokenizer, WorkloadSpec, build_requests, chat_body

SCENARIOS = ("json-schema", "tools-required", "penalties", "prefix-cache")
_FIRST_INDEX = {"plain": 2_000_000, "json-schema": 2_100_000, "long-keys": 2_200_000, "tools-required": 2_300_000}
_FIRST_INDEX["penalties"] = 2_400_000

RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "summary": {"type": "string", "maxLength": 200},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "minItems": 1, "maxItems": 4},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "is_fiction": {"type": "boolean"},
    },
    "required": ["title", "summary", "keywords", "year", "is_fiction"],
    "additionalProperties": False,
}
_LONG_KEYS = (
    "the_full_name_of_the_main_character_of_this_story",
    "the_city_where_the_events_of_this_story_take_place",
    "the_number_of_chapters_this_story_would_need",
    "whether_the_story_has_a_happy_ending_for_everyone",
    "the_single_most_important_object_in_the_whole_story",
)
LONG_KEYS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        _LONG_KEYS[0]: {"type": "string", "maxLength": 24},
        _LONG_KEYS[1]: {"type": "string", "maxLength": 24},
        _LONG_KEYS[2]: {"type": "integer", "minimum": 1, "maximum": 99},
        _LONG_KEYS[3]: {"type": "boolean"},
        _LONG_KEYS[4]: {"type": "string", "maxLength": 24},
    },
    "required": list(_LONG_KEYS),
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["city", "unit"], "additionalProperties": False},
    }},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money from one currency to another",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY", "CHF"]},
            "to_currency": {"type": "string", "enum": ["USD", "EUR", "GBP", "JPY", "CHF"]},
        }, "required": ["amount", "from_currency", "to_currency"], "additionalProperties": False},
    }},
]  # fmt: skip
_NUM_EXAMPLES = 3
_FAST_FORWARD_FLAG = re.compile(r"--[\w-]*fast[-_]?forward[\w-]*")
Validator = Callable[[Any, dict[str, Any]], bool]


@dataclass(frozen=True, slots=True)
class ScenarioContext:
    client: httpx.AsyncClient
    target: TargetRun
    model_id: str
    workload: WorkloadSpec
    concurrency: int
    tokenizer: Tokenizer | None
    log: Log


def schema_validator() -> Validator | None:
    """`jsonschema` when installed (the `bench` extra), else None: outputs are then only parsed."""
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError:
        return None

    def valid(instance: Any, schema: dict[str, Any]) -> bool:
        return bool(jsonschema.Draft202012Validator(schema).is_valid(instance))

    return valid


def check_json(text: str, schema: dict[str, Any], validator: Validator | None) -> bool:
    try:
        instance = json.loads(text)
    except json.JSONDecodeError:
        return False
    return validator(instance, schema) if validator is not None else True


_FORCED_METRIC = re.compile(r"^loom:grammar_forced_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.MULTILINE)


async def forced_tokens(client: httpx.AsyncClient) -> float | None:
    """Loom's count of tokens appended by grammar fast-forward so far (`/metrics`), None elsewhere."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    found = _FORCED_METRIC.search(response.text) if response.status_code == 200 else None
    return float(found.group(1)) if found else None


async def _counting_forced(
    ctx: ScenarioContext, name: str, bodies: list[dict[str, Any]]
) -> tuple[PhaseResult, list[RequestRecord], int | None]:
    before = await forced_tokens(ctx.client)
    run, records = await _measure(ctx, name, bodies)
    after = await forced_tokens(ctx.client)
    return run, records, None if before is None or after is None else int(after - before)


def fast_forward_switch(help_text: str) -> str | None:
    """The `loom serve` flag that turns grammar fast-forward on or off, if its help lists one."""
    found = _FAST_FORWARD_FLAG.search(help_text)
    return found.group(0) if found else None


def loom_serve_help() -> str:
    done = subprocess.run([sys.executable, "-m", "loom.cli", "serve", "--help"], capture_output=True, text=True)
    return done.stdout


def finish_reasons(records: Sequence[RequestRecord]) -> str:
    """`"stop:30 length:2"`: why the answers ended, at a glance."""
    counts = Counter(str(r.finish_reason) for r in records if r.ok)
    return " ".join(f"{reason}:{n}" for reason, n in sorted(counts.items()))


def examples(records: Sequence[RequestRecord]) -> tuple[str, ...]:
    answers = []
    for r in records[:_NUM_EXAMPLES]:
        calls = " ".join(f"{c.name}({c.arguments})" for c in r.tool_calls)
        answers.append((r.text + (" " if r.text and calls else "") + calls)[:500] if r.ok else f"failed: {r.error}")
    return tuple(answers)


def _requests(ctx: ScenarioContext, key: str) -> list[BenchRequest]:
    return build_requests(ctx.workload, ctx.concurrency, _FIRST_INDEX[key], ctx.tokenizer)


async def _measure(
    ctx: ScenarioContext, name: str, bodies: list[dict[str, Any]]
) -> tuple[PhaseResult, list[RequestRecord]]:
    return await measure_phase(ctx.client, PhaseShape(ctx.target.name, name, ctx.concurrency), bodies, ctx.log)


async def plain_reference(ctx: ScenarioContext) -> PhaseResult:
    found = ctx.target.plain_at(ctx.concurrency, ctx.concurrency)
    if found is not None:
        return found
    bodies = [chat_body(ctx.model_id, request, ctx.workload) for request in _requests(ctx, "plain")]
    result, _ = await _measure(ctx, f"plain c={ctx.concurrency}", bodies)
    ctx.target.phases.append(result)
    return result


async def matched_plain(
    ctx: ScenarioContext,
    name: str,
    bodies: Sequence[dict[str, Any]],
    records: Sequence[RequestRecord],
    constraint: tuple[str, ...],
) -> PhaseResult | None:
    """The same requests with their `constraint` fields left out (the prompt stays the same: tools
    without `tool_choice` are `auto`, rendered as before), each asking for exactly as many tokens
    as its constrained twin produced (`ignore_eos`): the unconstrained cost of the same work. A
    constrained answer ends where its grammar does, usually far short of the plain run's length,
    and short answers spend more of their time in prefill: only equal prompts and lengths compare
    the decoding. None when the workload may not send `ignore_eos`."""
    if not ctx.workload.ignore_eos:
        return None
    # The constrained run just prefilled these prompts: a prefix cache would serve them to the plain
    # twins for free. Loom and vLLM keep a salted request's blocks apart; other servers are told nothing.
    salt = {"cache_salt": f"matched-plain-{name}"} if ctx.target.kind in ("loom", "vllm") else {}
    plain = [
        {**{k: v for k, v in body.items() if k not in constraint}, "max_tokens": r.output_tokens, "ignore_eos": True}
        | salt
        for body, r in zip(bodies, records, strict=True)
        if r.ok and r.output_tokens > 0
    ]
    result, _ = await _measure(ctx, f"{name} matched plain", plain)
    return result


def _constrained_body(ctx: ScenarioContext, request: BenchRequest, ask: str, extra: dict[str, Any]) -> dict[str, Any]:
    body = chat_body(ctx.model_id, request, ctx.workload)
    body.pop("ignore_eos", None)  # a constrained answer ends where its grammar does
    body["max_tokens"] = 2 * request.max_tokens  # room to finish: a cut answer never validates
    body["messages"] = [{"role": "user", "content": f"{request.prompt}\n\n{ask}"}]
    return {**body, **extra}


def _schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}}


async def json_schema(ctx: ScenarioContext) -> ScenarioResult:
    plain = await plain_reference(ctx)
    validator = schema_validator()
    ask = "Write a JSON record about the text above."
    bodies = [
        _constrained_body(ctx, r, ask, _schema_format("record", RECORD_SCHEMA)) for r in _requests(ctx, "json-schema")
    ]
    run, records, forced = await _counting_forced(ctx, "json-schema", bodies)
    matched = await matched_plain(ctx, "json-schema", bodies, records, ("response_format",))
    ok = [r for r in records if r.ok]
    notes = (
        [] if validator else ["jsonschema is not installed (pip install 'loom[bench]'): outputs only parsed as JSON"]
    )
    values: dict[str, Any] = {
        "output_tok_s_ratio": ratio(run.output_tok_s, plain.output_tok_s),
        "matched_plain_tok_s": matched.output_tok_s if matched else None,
        "matched_ratio": ratio(run.output_tok_s, matched.output_tok_s) if matched else None,
        "requests": len(records), "finish_reasons": finish_reasons(records),
        "finished_stop": sum(r.finish_reason == "stop" for r in ok),
        "valid": sum(check_json(r.text, RECORD_SCHEMA, validator) for r in ok),
        "validated_with": "jsonschema" if validator else "json.loads", "forced_tokens": forced,
        "output_tokens": sum(r.output_tokens for r in ok),
    }  # fmt: skip
    long_bodies = [
        _constrained_body(
            ctx, r, "Describe the story above as a JSON record.", _schema_format("story", LONG_KEYS_SCHEMA)
        )
        for r in _requests(ctx, "long-keys")
    ]
    long_run, long_records, long_forced = await _counting_forced(ctx, "json-schema long keys", long_bodies)
    values["long_keys_req_s"] = long_run.req_s
    values["long_keys_forced_tokens"] = long_forced
    values["long_keys_output_tokens"] = sum(r.output_tokens for r in long_records if r.ok)
    values["long_keys_valid"] = sum(check_json(r.text, LONG_KEYS_SCHEMA, validator) for r in long_records if r.ok)
    values["long_keys_finish_reasons"] = finish_reasons(long_records)
    if ctx.target.kind == "loom":
        switch = fast_forward_switch(loom_serve_help())
        values["fast_forward_switch"] = switch
        notes.append(f"fast-forward on/off: add a target NAME=loom:{switch} to compare" if switch
                     else "fast-forward on/off: not available (`loom serve --help` shows no fast-forward switch)")  # fmt: skip
    samples = examples(records) + examples(long_records)
    return ScenarioResult(
        "json-schema",
        ctx.target.name,
        run,
        plain,
        values,
        tuple(notes),
        (long_run, *([matched] if matched else [])),
        samples,
    )


def tool_call_validity(records: list[RequestRecord], validator: Validator | None) -> dict[str, Any]:
    """Validity over the calls of answers that ended on their own (`tool_calls`, `stop`); an answer
    cut by `max_tokens` streams its last call unfinished, as OpenAI's do: counted apart."""
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    ended = [r for r in records if r.ok and r.finish_reason != "length"]
    calls = [call for r in ended for call in r.tool_calls]
    valid = sum(
        call.name in parameters and check_json(call.arguments, parameters[call.name], validator) for call in calls
    )
    return {
        "requests": len(records), "requests_with_calls": sum(bool(r.tool_calls) for r in records if r.ok),
        "finished_tool_calls": sum(r.finish_reason == "tool_calls" for r in records if r.ok),
        "calls": len(calls), "valid_calls": valid, "valid_share": valid / len(calls) if calls else None,
        "calls_cut_short": sum(len(r.tool_calls) for r in records if r.ok and r.finish_reason == "length"),
    }  # fmt: skip


async def tools_required(ctx: ScenarioContext) -> ScenarioResult:
    plain = await plain_reference(ctx)
    ask = "Before you answer, look up the weather in a city of the text, or convert a price."
    extra = {"tools": TOOLS, "tool_choice": "required"}
    bodies = [_constrained_body(ctx, r, ask, extra) for r in _requests(ctx, "tools-required")]
    run, records = await _measure(ctx, "tools-required", bodies)
    matched = await matched_plain(ctx, "tools-required", bodies, records, ("tool_choice",))
    validator = schema_validator()
    values = {
        "output_tok_s_ratio": ratio(run.output_tok_s, plain.output_tok_s),
        "matched_plain_tok_s": matched.output_tok_s if matched else None,
        "matched_ratio": ratio(run.output_tok_s, matched.output_tok_s) if matched else None,
        **tool_call_validity(records, validator),
    }
    values["validated_with"] = "jsonschema" if validator else "json.loads"
    values["finish_reasons"] = finish_reasons(records)
    more = (matched,) if matched else ()
    return ScenarioResult(
        "tools-required", ctx.target.name, run, plain, values, more_runs=more, examples=examples(records)
    )


async def penalties(ctx: ScenarioContext) -> ScenarioResult:
    plain = await plain_reference(ctx)
    bodies = [extras.sampler_body(chat_body(ctx.model_id, r, ctx.workload)) for r in _requests(ctx, "penalties")]
    run, _ = await _measure(ctx, "penalties+logprobs", bodies)
    values = {"output_tok_s_ratio": ratio(run.output_tok_s, plain.output_tok_s)}
    return ScenarioResult("penalties", ctx.target.name, run, plain, dict(values))


async def prefix_cache(ctx: ScenarioContext) -> ScenarioResult:
    ctx.log(f"{ctx.target.name}: prefix cache, ~1,000-token system prompt, cold vs warm ...")
    pc = await extras.prefix_cache_ttft(ctx.client, ctx.model_id)
    values = {
        "system_prompt_tokens": pc.system_prompt_tokens, "cold_ttft_s": pc.cold_ttft_s,
        "warm_ttft_s": pc.warm_ttft_s, "cached_tokens": pc.cached_tokens, "warm_speedup": pc.speedup,
    }  # fmt: skip
    return ScenarioResult("prefix-cache", ctx.target.name, None, None, dict(values))


RUNNERS = {
    "json-schema": json_schema,
    "tools-required": tools_required,
    "penalties": penalties,
    "prefix-cache": prefix_cache,
}
