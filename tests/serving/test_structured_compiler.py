"""Serving's structured-output compiler: limits, nested-repetition refusal, backends, the time budget
off the event loop, and the bounded cache. Runs over a byte-level tokenizer (no model)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from byte_tokenizer import byte_tokenizer

from loom.serving.structured import (
    MAX_ENUM_VALUES,
    MAX_JSON_DEPTH,
    MAX_SPEC_CHARS,
    StructuredOutputCompiler,
    StructuredOutputSpec,
    check_limits,
    nested_repetition,
)
from loom.serving.types import InvalidRequest
from loom.tokenizer import HFTokenizer

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return byte_tokenizer()


@pytest.fixture
async def compiler(tok: HFTokenizer) -> StructuredOutputCompiler:
    return StructuredOutputCompiler(tok, cache_size=2)


def nested(depth: int) -> str:
    schema: dict[str, object] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return json.dumps(schema)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (StructuredOutputSpec("regex", "a" * (MAX_SPEC_CHARS + 1), param="guided_regex"), "characters long"),
        (StructuredOutputSpec("json", nested(MAX_JSON_DEPTH), param="guided_json"), "nests deeper"),
        (StructuredOutputSpec("json", json.dumps({"enum": list(range(MAX_ENUM_VALUES + 1))})), "enum of"),
        (StructuredOutputSpec("choice", json.dumps([str(i) for i in range(MAX_ENUM_VALUES + 1)])), "choices"),
        (StructuredOutputSpec("choice", "[]", param="guided_choice"), "non-empty list"),
        (StructuredOutputSpec("json", "[1, 2]"), "must be a JSON object"),
        (StructuredOutputSpec("json", "{"), "not valid JSON"),
        (StructuredOutputSpec("regex", "(a+)+b", param="guided_regex"), "repeats a group"),
        (StructuredOutputSpec("json", json.dumps({"type": "string", "pattern": "(.*a){30}"})), "repeats a group"),
    ],
)
def test_limits_and_malformed_specs_are_422_naming_the_field(spec: StructuredOutputSpec, reason: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_limits(spec)
    assert info.value.status_code == 422 and info.value.param == spec.param
    assert reason in info.value.message and info.value.message.startswith(spec.param)


def test_a_schema_just_within_the_depth_limit_passes() -> None:
    check_limits(StructuredOutputSpec("json", nested(MAX_JSON_DEPTH - 2)))


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        ("(a+)+b", True), ("(.*a){30}", True), ("(x+x+)+y", True), ("(a.*)+", True), ("(?:a|(b+))+", True),
        (r"(\.\d+)+", False), (r"\d+(\.\d+)+", False), ('(,\\s*"[^"]*")*', False), ("[a-z]{2,6}-[0-9]{1,3}", False),
        (r"\p{L}+", False),
    ],
)  # fmt: skip
def test_nested_repetition_is_recognized(pattern: str, refused: bool) -> None:
    assert nested_repetition(pattern) is refused


async def test_compiles_each_kind_and_caches_equal_specs(compiler: StructuredOutputCompiler) -> None:
    first = await compiler.compile(StructuredOutputSpec("json", SCHEMA, param="guided_json"))
    again = await compiler.compile(StructuredOutputSpec("json", SCHEMA, param="response_format"))
    assert again is first  # the field a constraint came from is not part of its identity
    for spec in (StructuredOutputSpec("regex", "[0-9]+"), StructuredOutputSpec("json_object", "")):
        assert (await compiler.compile(spec)).new_grammar().bitmask_words == 9  # 257 tokens / 32


async def test_requests_for_a_constraint_being_compiled_wait_for_that_one_compilation(
    compiler: StructuredOutputCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    compile_now = compiler._compile_now

    def counted(spec: StructuredOutputSpec, backend: str | None) -> object:
        calls.append(spec)
        return compile_now(spec, backend)

    monkeypatch.setattr(compiler, "_compile_now", counted)
    spec = StructuredOutputSpec("json", SCHEMA, param="response_format")
    results = await asyncio.gather(*(compiler.compile(spec) for _ in range(16)))
    assert len(calls) == 1 and all(r is results[0] for r in results) and not compiler._inflight
    bad = StructuredOutputSpec("regex", "(ab", param="guided_regex")
    failures = await asyncio.gather(*(compiler.compile(bad) for _ in range(4)), return_exceptions=True)
    assert len(calls) == 2 and all(isinstance(f, InvalidRequest) for f in failures) and not compiler._inflight


async def test_the_cache_is_bounded_and_least_recently_used_goes_first(compiler: StructuredOutputCompiler) -> None:
    specs = [StructuredOutputSpec("regex", f"x{i}[0-9]+") for i in range(3)]
    compiled = [await compiler.compile(s) for s in specs]
    assert len(compiler._cache) == 2
    assert await compiler.compile(specs[2]) is compiled[2]
    assert await compiler.compile(specs[0]) is not compiled[0]  # evicted, compiled anew


@pytest.mark.parametrize(("spec", "fragment"), [
    (StructuredOutputSpec("regex", "(ab", param="guided_regex"), "invalid regex"),
    (StructuredOutputSpec("json", '{"type": "strin"}', param="response_format"), "invalid json"),
    (StructuredOutputSpec("grammar", "start: nothing_here", param="guided_grammar"), "invalid grammar"),
])  # fmt: skip
async def test_constraints_that_do_not_compile_are_422(
    compiler: StructuredOutputCompiler, spec: StructuredOutputSpec, fragment: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await compiler.compile(spec)
    assert info.value.status_code == 422 and info.value.param == spec.param and fragment in info.value.message


async def test_unknown_or_missing_backends_are_422_listing_the_available_ones(
    compiler: StructuredOutputCompiler,
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await compiler.compile(StructuredOutputSpec("regex", "[0-9]+", backend="outlines", param="guided_regex"))
    assert info.value.param == "guided_decoding_backend" and "available: llguidance" in info.value.message
    assert await compiler.compile(StructuredOutputSpec("regex", "[0-9]+", backend="guidance"))  # vLLM's alias


async def test_compiling_runs_off_the_event_loop_and_past_its_budget_is_422(tok: HFTokenizer) -> None:
    slow = StructuredOutputCompiler(tok, compile_budget_s=0.005)
    slow.warm_up()
    # ~50 KB of schema: 800 properties, each its own pattern, take ~60 ms to build
    props = {f"k{i}": {"type": "string", "pattern": f"[a-z]{{{i % 7 + 1},{i % 7 + 9}}}x{i}"} for i in range(800)}
    big = json.dumps({"type": "object", "properties": props, "required": list(props)})
    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    start = time.perf_counter()
    with pytest.raises(InvalidRequest) as info:
        await slow.compile(StructuredOutputSpec("json", big, param="guided_json"))
    assert time.perf_counter() - start < 1.0 and "did not compile within" in info.value.message
    await asyncio.sleep(0.05)
    beat.cancel()
    assert ticks >= 5  # the loop kept running while the pool worked
    slow.close()
