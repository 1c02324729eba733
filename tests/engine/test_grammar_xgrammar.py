"""The optional xgrammar backend over the default model's tokenizer (no weights): each kind of
constraint compiles, a matcher walked over a valid string's tokens accepts them and ends
terminated, a wrong token is refused, rollback restores the state, the bitmask allows exactly the
tokens the matcher accepts, and bad constraints are `GrammarError`. Skipped where xgrammar is not
installed (it is optional: `pip install --no-deps xgrammar apache-tvm-ffi`).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("xgrammar")

from loom.engine.grammar import (  # noqa: E402
    CompiledGrammar,
    Grammar,
    GrammarBackends,
    GrammarError,
    GrammarKind,
    GrammarSource,
    apply_grammar_bitmask,
)
from loom.engine.grammar_xgrammar import XGrammarBackend  # noqa: E402
from loom.models.default import default_model_path  # noqa: E402
from loom.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TAG_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TAG = {"type": "tag", "begin": "<f>", "content": {"type": "json_schema", "json_schema": TAG_SCHEMA}, "end": "</f>"}
LEGACY_TAG = {"structures": [{"begin": "<f>", "schema": TAG_SCHEMA, "end": "</f>"}], "triggers": ["<f"]}
CHOICES = ["alpha", "gamma delta", 'q"\\é😀\n']

# (kind, constraint text, a string that completes it)
VALID: list[tuple[GrammarKind, str, str]] = [
    ("json", json.dumps(SCHEMA), '{"name":"Bo","age":42}'),
    ("json_object", "", '{"a":[1,2],"b":{"c":null}}'),  # compact in free-form values too (xgrammar >= 0.2.9)
    ("regex", r"[a-z]{2,6}-[0-9]{3}", "abc-123"),
    ("choice", json.dumps(CHOICES), "gamma delta"),
    ("choice", json.dumps(CHOICES), 'q"\\é😀\n'),
    ("grammar", 'root ::= "(" [0-9]+ "," [0-9]+ ")"', "(1,22)"),
    ("grammar", 'start: "(" NUM "," NUM ")"\nNUM: /[0-9]{1,2}/', "(7,42)"),
    ("structural_tag", json.dumps({"format": TAG}), '<f>{"a":1}</f>'),
]


@pytest.fixture(scope="module")
def tok() -> HFTokenizer:
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def backend(tok: HFTokenizer) -> XGrammarBackend:
    return XGrammarBackend(tok)


def new_grammar(backend: XGrammarBackend, kind: GrammarKind, text: str, **options: object) -> Grammar:
    source = GrammarSource(kind, text, **options)  # type: ignore[arg-type]
    compiled = _COMPILED.get(source)
    if compiled is None:  # a schema compiles in ~0.3 s on a busy CPU: once per module
        compiled = _COMPILED[source] = backend.compile(source)
    return compiled.new_grammar()


_COMPILED: dict[GrammarSource, CompiledGrammar] = {}


def allowed(grammar: Grammar) -> set[int]:
    mask = torch.zeros((1, grammar.bitmask_words), dtype=torch.int32)
    grammar.fill_bitmask(mask, 0)
    bits = (mask[0].unsqueeze(1) >> torch.arange(32)) & 1  # [words, 32]
    return set(bits.flatten().nonzero().flatten().tolist())


def test_the_registry_builds_it_by_name(tok: HFTokenizer) -> None:
    assert "xgrammar" in GrammarBackends.available()
    assert GrammarBackends(tok, default="xgrammar").get().name == "xgrammar"


@pytest.mark.parametrize(("kind", "text", "valid"), VALID, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(VALID)])
def test_a_valid_string_is_accepted_token_by_token_and_terminates(
    backend: XGrammarBackend, tok: HFTokenizer, kind: GrammarKind, text: str, valid: str
) -> None:
    grammar = new_grammar(backend, kind, text)
    assert grammar.bitmask_words == (tok.vocab_size + 31) // 32
    for token in tok.encode(valid):
        assert not grammar.is_terminated()
        assert token in allowed(grammar)
        assert grammar.accept_tokens([token])
    assert grammar.is_terminated()  # only EOS may follow, without sampling it
    assert allowed(grammar) == {tok.eos_token_id}


def test_a_token_the_constraint_forbids_is_refused(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    grammar = new_grammar(backend, "regex", "[0-9]{3}")
    assert grammar.accept_tokens(tok.encode("1"))
    assert not grammar.accept_tokens(tok.encode("x"))
    assert not new_grammar(backend, "json", json.dumps(SCHEMA)).accept_tokens(tok.encode('{"age":'))


def test_a_grammar_that_may_go_on_is_not_terminated_until_eos(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    grammar = new_grammar(backend, "regex", "[0-9]+")
    assert grammar.accept_tokens(tok.encode("12"))
    assert not grammar.is_terminated()
    assert tok.eos_token_id in allowed(grammar) and tok.encode("3")[0] in allowed(grammar)
    assert grammar.accept_tokens([tok.eos_token_id]) and grammar.is_terminated()


def test_rollback_restores_the_mask_and_the_walk(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    grammar = new_grammar(backend, "json", json.dumps(SCHEMA))
    ids = tok.encode('{"name":"Bo","age":42}')
    assert grammar.accept_tokens(ids[:3])
    before = allowed(grammar)
    assert grammar.accept_tokens(ids[3:])
    assert grammar.is_terminated()  # also keeps the final mask: rollback must drop it
    grammar.rollback(len(ids) - 3)
    assert not grammar.is_terminated()
    assert allowed(grammar) == before
    assert grammar.accept_tokens(ids[3:]) and grammar.is_terminated()


def test_the_bitmask_allows_exactly_the_tokens_the_matcher_accepts(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    grammar = new_grammar(backend, "json", json.dumps(SCHEMA))
    prefix = tok.encode('{"name":"B')
    positions = (0, 2, len(prefix))  # the open brace, inside a fixed key, inside a free string
    walked = 0
    for position in positions:
        assert grammar.accept_tokens(prefix[walked:position])
        walked = position
        mask = allowed(grammar)
        accepted = set()
        for token in range(tok.vocab_size):
            if grammar.accept_tokens([token]):
                accepted.add(token)
                grammar.rollback(1)
        assert mask == accepted and mask, position


def test_the_filled_rows_ban_the_right_logits_and_only_their_row(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    grammar = new_grammar(backend, "choice", json.dumps(["yes", "no"]))
    words = grammar.bitmask_words
    bitmask = torch.full((3, words), 7, dtype=torch.int32)
    grammar.fill_bitmask(bitmask, 1)
    assert (bitmask[0] == 7).all() and (bitmask[2] == 7).all()
    logits = torch.zeros(1, tok.vocab_size)
    apply_grammar_bitmask(logits, torch.tensor([0]), bitmask[1:2])
    assert set(torch.isfinite(logits[0]).nonzero().flatten().tolist()) == allowed(grammar)
    with pytest.raises(ValueError):
        grammar.fill_bitmask(torch.zeros((1, words - 1), dtype=torch.int32), 0)


def test_json_is_compact_unless_asked_and_closes_objects_on_request(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    spaced = tok.encode('{"name": "Bo", "age": 4}')
    assert not new_grammar(backend, "json", json.dumps(SCHEMA)).accept_tokens(spaced)
    assert new_grammar(backend, "json", json.dumps(SCHEMA), compact_whitespace=False).accept_tokens(spaced)
    extra = tok.encode('{"name":"Bo","age":4,"x":1}')
    assert new_grammar(backend, "json", json.dumps(SCHEMA)).accept_tokens(extra)
    assert not new_grammar(backend, "json", json.dumps(SCHEMA), no_additional_properties=True).accept_tokens(extra)


def test_the_legacy_structural_tag_is_free_text_around_triggered_json(
    backend: XGrammarBackend, tok: HFTokenizer
) -> None:
    grammar = new_grammar(backend, "structural_tag", json.dumps(LEGACY_TAG))
    assert grammar.accept_tokens(tok.encode('say <f>{"a":1}</f> done'))
    assert not grammar.is_terminated()  # free text may follow
    assert not new_grammar(backend, "structural_tag", json.dumps(LEGACY_TAG)).accept_tokens(tok.encode('<f>{"b":1}'))


def test_forced_tokens_spell_the_fixed_text_and_are_accepted(backend: XGrammarBackend, tok: HFTokenizer) -> None:
    grammar = new_grammar(backend, "json", json.dumps(SCHEMA))
    forced = grammar.forced_tokens()
    assert forced and '{"name":"'.startswith(tok.decode(forced))
    assert grammar.accept_tokens(forced)
    choice = new_grammar(backend, "choice", json.dumps(["alpha", "gamma delta"]))
    assert choice.accept_tokens(tok.encode("gam"))
    rest = choice.forced_tokens()
    assert tok.decode(rest) == "ma delta"  # it ends the constraint: nothing is held back
    assert choice.accept_tokens(rest) and choice.is_terminated()
    assert new_grammar(backend, "regex", "[0-9]+").forced_tokens() == []


@pytest.mark.parametrize(
    ("kind", "text", "options"),
    [
        ("regex", "(ab", {}),
        ("regex", r"\p{L}+", {}),
        ("json", "{", {}),
        ("json", '{"type": "strin"}', {}),
        ("json", "[1]", {}),
        ("json", json.dumps(SCHEMA), {"whitespace_pattern": "[ ]?"}),
        ("grammar", "start: missing_rule", {}),
        ("grammar", "root ::= missing", {}),
        ("choice", "[1, 2", {}),
        ("choice", "[1, 2]", {}),
        ("structural_tag", '{"format": {"type": "nope"}}', {}),
        ("structural_tag", '{"structures": [{"schema": {}}], "triggers": ["<"]}', {}),
    ],
)
def test_invalid_constraints_raise_grammar_error_with_a_plain_reason(
    backend: XGrammarBackend, kind: GrammarKind, text: str, options: dict[str, object]
) -> None:
    with pytest.raises(GrammarError) as info:
        backend.compile(GrammarSource(kind, text, **options))  # type: ignore[arg-type]
    message = str(info.value)
    assert message and "/project/cpp" not in message and len(message) <= 400
