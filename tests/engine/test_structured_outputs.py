"""Structured outputs through the whole engine core: llguidance grammars over a real (byte-level)
tokenizer steering a random tiny model, beside unconstrained requests in the same batches.

Whatever the model prefers, a request that finishes with "stop" has text that satisfies its
constraint; a free neighbour's tokens are those of its solo run; the grammar survives preemption
(its recompute gives the same tokens); seeds, min_tokens, logit_bias and logprobs keep their
meaning under a grammar.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from tiny_engine import EOS, Finished, build_core, byte_tokenizer, run, tiny_model

from loom.engine.grammar import CompiledGrammar, GrammarError, GrammarSource
from loom.engine.grammar_llguidance import LLGuidanceBackend
from loom.engine.sampling_params import SamplingParams
from loom.engine.scheduler import SchedulerOutput
from loom.models.llama import LlamaModel
from loom.tokenizer import HFTokenizer

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ["alpha", "beta", "gamma delta"]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return byte_tokenizer()


@pytest.fixture(scope="module")
def backend(tok: HFTokenizer) -> LLGuidanceBackend:
    return LLGuidanceBackend(tok)


@pytest.fixture(scope="module")
def model(tok: HFTokenizer) -> LlamaModel:
    return tiny_model(tok.vocab_size)


@pytest.fixture(scope="module")
def prompt(tok: HFTokenizer) -> tuple[int, ...]:
    return tuple(tok.encode("Answer: "))


def compiled(backend: LLGuidanceBackend, kind: str, text: str) -> CompiledGrammar:
    return backend.compile(GrammarSource(kind, text))  # type: ignore[arg-type]


def text_of(tok: HFTokenizer, result: Finished) -> str:
    ids = result.token_ids[:-1] if result.token_ids and result.token_ids[-1] == EOS else result.token_ids
    return tok.decode(ids)


def test_each_kind_of_constraint_holds_beside_a_free_request(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    solo = run(build_core(model), {"free": (prompt, free)})["free"].token_ids
    constrained = {
        "json": compiled(backend, "json", json.dumps(SCHEMA)),
        "regex": compiled(backend, "regex", REGEX),
        "choice": compiled(backend, "choice", json.dumps(CHOICES)),
        "grammar": compiled(backend, "grammar", 'start: "(" NUM "," NUM ")"\nNUM: /[0-9]{1,2}/'),
        "json_object": compiled(backend, "json_object", ""),
    }
    requests = {
        name: (prompt, SamplingParams(max_tokens=80, temperature=0.8, seed=i, grammar=g))
        for i, (name, g) in enumerate(constrained.items())
    }
    results = run(build_core(model), {**requests, "free": (prompt, free)})
    assert results["free"].token_ids == solo
    for name in constrained:
        assert results[name].finish_reason == "stop", name
    jsonschema.validate(json.loads(text_of(tok, results["json"])), SCHEMA)
    assert re.fullmatch(REGEX, text_of(tok, results["regex"]))
    assert text_of(tok, results["choice"]) in CHOICES
    assert re.fullmatch(r"\([0-9]{1,2},[0-9]{1,2}\)", text_of(tok, results["grammar"]))
    assert isinstance(json.loads(text_of(tok, results["json_object"])), dict)


def test_json_is_compact_by_default(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "json", json.dumps(SCHEMA))
    results = run(
        build_core(model), {f"r{i}": (prompt, SamplingParams(max_tokens=80, seed=i, grammar=grammar)) for i in range(4)}
    )
    for result in results.values():
        text = text_of(tok, result)
        assert (
            result.finish_reason == "stop"
            and json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False) == text
        )


def test_a_complete_grammar_ends_the_request_with_stop_without_sampling_eos(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "choice", json.dumps(["yes", "no"]))
    result = run(
        build_core(model), {"r": (prompt, SamplingParams(max_tokens=20, min_tokens=10, temperature=0, grammar=grammar))}
    )["r"]
    assert result.finish_reason == "stop" and tok.decode(result.token_ids) in (
        "yes",
        "no",
    )  # min_tokens cannot outlast it


def test_min_tokens_holds_eos_back_while_the_grammar_allows_more(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "regex", "[a-z]+")
    for seed in range(3):
        params = SamplingParams(max_tokens=12, min_tokens=6, temperature=1.0, seed=seed, grammar=grammar)
        result = run(build_core(model), {"r": (prompt, params)})["r"]
        text = text_of(tok, result)
        assert re.fullmatch("[a-z]+", text) and len(text) >= 6


def test_logit_bias_cannot_force_a_token_the_grammar_forbids(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "choice", json.dumps(CHOICES))
    (x,) = tok.encode("x")
    params = SamplingParams(max_tokens=20, temperature=0, logit_bias=((x, 100.0),), logprobs=1, grammar=grammar)
    result = run(build_core(model), {"r": (prompt, params)})["r"]
    assert result.finish_reason == "stop" and text_of(tok, result) in CHOICES


def test_a_seeded_constrained_request_samples_the_same_alone_or_batched(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "json", json.dumps(SCHEMA))
    target = SamplingParams(max_tokens=60, temperature=1.0, seed=77, grammar=grammar)
    alone = run(build_core(model), {"t": (prompt, target)})["t"].token_ids
    others = {
        f"o{i}": (prompt, SamplingParams(max_tokens=30, temperature=1.2, grammar=grammar if i % 2 else None))
        for i in range(4)
    }
    assert run(build_core(model), {**others, "t": (prompt, target)})["t"].token_ids == alone


def test_grammar_state_survives_preemption(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "json", json.dumps(SCHEMA))
    requests = {
        f"r{i}": (prompt, SamplingParams(max_tokens=60, temperature=0.9, seed=i, grammar=grammar)) for i in range(6)
    }
    roomy = run(build_core(model), requests)
    tight = build_core(model, num_blocks=40)  # 6 requests of ~70 tokens in 4-token blocks do not fit
    preempted: list[str] = []
    schedule = tight.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        preempted.extend(r.req_id for r in out.preempted)
        return out

    tight.scheduler.schedule = recording_schedule  # type: ignore[method-assign]
    squeezed = run(tight, requests)
    assert preempted, "the pool was meant to force preemption"
    for req_id in requests:
        assert squeezed[req_id].token_ids == roomy[req_id].token_ids, req_id
        if squeezed[req_id].finish_reason == "stop":
            jsonschema.validate(json.loads(text_of(tok, squeezed[req_id])), SCHEMA)


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("regex", "(ab"),
        ("json", "{"),
        ("json", '{"type": "strin"}'),
        ("grammar", "start: missing_rule"),
        ("choice", "[1, 2"),
        ("structural_tag", '{"format": {"type": "nope"}}'),
    ],
)
def test_invalid_constraints_raise_grammar_error(backend: LLGuidanceBackend, kind: str, text: str) -> None:
    with pytest.raises(GrammarError):
        compiled(backend, kind, text)


def test_catastrophic_regexes_compile_quickly_and_stay_bounded(backend: LLGuidanceBackend, tok: HFTokenizer) -> None:
    import time

    for pattern in ("(a+)+b", "(.*a){30}", "(a|aa)*c"):
        start = time.perf_counter()
        grammar = compiled(backend, "regex", pattern).new_grammar()
        assert grammar.accept_tokens(tok.encode("aaaaaaaaaaaaaaaaaaaa"))
        assert time.perf_counter() - start < 2.0, pattern


LONG_KEYS = {
    "type": "object",
    "properties": {
        "customer_full_name": {"type": "string", "maxLength": 6},
        "customer_loyalty_program_member": {"type": "boolean"},
        "preferred_delivery_window": {"enum": ["morning", "evening"]},
    },
    "required": ["customer_full_name", "customer_loyalty_program_member", "preferred_delivery_window"],
    "additionalProperties": False,
}


def test_fast_forward_appends_forced_tokens_in_fewer_steps(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "json", json.dumps(LONG_KEYS))
    requests = {
        f"r{i}": (prompt, SamplingParams(max_tokens=200, temperature=0.9, seed=i, grammar=grammar)) for i in range(3)
    }
    slow_core, fast_core = build_core(model, fast_forward=False), build_core(model)
    slow, fast = run(slow_core, requests), run(fast_core, requests)
    assert slow_core.num_forced_tokens == 0 and fast_core.num_forced_tokens > 3 * 60  # the keys, at least
    for req_id in requests:
        for result in (slow[req_id], fast[req_id]):
            assert result.finish_reason == "stop"
            jsonschema.validate(json.loads(text_of(tok, result)), LONG_KEYS)
        assert fast[req_id].num_outputs < len(fast[req_id].token_ids) / 3  # most tokens arrived forced
        assert slow[req_id].num_outputs == len(slow[req_id].token_ids)


def test_fast_forward_keeps_seeded_requests_the_same_alone_or_batched(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    grammar = compiled(backend, "json", json.dumps(LONG_KEYS))
    target = SamplingParams(max_tokens=200, temperature=1.0, seed=5, grammar=grammar)
    alone = run(build_core(model), {"t": (prompt, target)})["t"].token_ids
    others = {
        f"o{i}": (prompt, SamplingParams(max_tokens=40, temperature=1.1, seed=9 + i, grammar=grammar)) for i in range(3)
    }
    assert run(build_core(model), {**others, "t": (prompt, target)})["t"].token_ids == alone


def test_requests_reporting_logprobs_are_not_fast_forwarded(
    model: LlamaModel, tok: HFTokenizer, backend: LLGuidanceBackend, prompt: tuple[int, ...]
) -> None:
    core = build_core(model)
    grammar = compiled(backend, "json", json.dumps(LONG_KEYS))
    result = run(core, {"r": (prompt, SamplingParams(max_tokens=200, temperature=0, logprobs=0, grammar=grammar))})["r"]
    assert core.num_forced_tokens == 0 and result.num_outputs == len(result.token_ids)
