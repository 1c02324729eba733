"""The llguidance grammar backend (the default): compiles a `GrammarSource` to a matcher per request.

Owns the bridge from Loom's Hugging Face tokenizer to llguidance's (an `LLTokenizer` from the
Rust tokenizer's JSON, as `llguidance.hf.from_tokenizer` builds it but without importing
`transformers` or building its tokenizer: ~0.5 s of a start-up; built once per backend), the translation of each kind of constraint into an llguidance
grammar, and the four verbs of `Grammar` over `LLMatcher`. Compiling builds one matcher (the
expensive part: lexer and parser tables; llguidance drops the GIL meanwhile); each request gets a
`deep_copy` of it.

Limits: llguidance bounds its own work by fuel (`LLParserLimits`): building a grammar's lexer,
and each token mask, stop with an error instead of running on, so a catastrophic regex such as
`(a+)+b` compiles in milliseconds and a mask step costs at most ~15 ms. A matcher that enters its
error state (a limit hit mid-generation, a token it did not allow) reports it by raising
`GrammarError` from `fill_bitmask` or returning False from `accept_tokens`: the core then fails
that request alone, never ending it with a "stop" its text would not satisfy.
Never decides which constraint a request has (serving does) and never touches logits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import llguidance
import torch
from llguidance import GrammarFormat

from loom.engine.grammar import GrammarError, GrammarSource, bitmask_words
from loom.engine.structural_tag import structural_tag_to_lark
from loom.tokenizer import Tokenizer

_FORMATS: dict[str, GrammarFormat] = {"regex": "regex", "choice": "choice", "grammar": "grammar"}  # Lark or GBNF
_MAX_ERROR_CHARS = 400  # llguidance quotes the grammar in its errors; keep a 4xx message short
_LIMITS = dict(verbose_errors=False)


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer) -> None:
        backend_json = getattr(tokenizer, "backend_json", None)
        if backend_json is None:
            raise GrammarError("structured outputs need a Hugging Face fast tokenizer, which this model does not have")
        self.ll_tokenizer = llguidance.LLTokenizer(backend_json(), eos_token=tokenizer.eos_token_id)

    def compile(self, source: GrammarSource) -> CompiledLLGuidance:
        grammar = _to_llguidance(source)
        matcher = llguidance.LLMatcher(
            self.ll_tokenizer, grammar, log_level=0, limits=llguidance.LLParserLimits(**_LIMITS)
        )
        if matcher.is_error():
            raise GrammarError(f"invalid {source.kind} constraint: {_short(matcher.get_error())}")
        return CompiledLLGuidance(matcher, self.ll_tokenizer.vocab_size, bool(self.ll_tokenizer.is_canonical))


class CompiledLLGuidance:
    backend = "llguidance"

    def __init__(self, template: llguidance.LLMatcher, vocab_size: int, canonical: bool) -> None:
        self._template = template  # never advanced: each request advances its own copy
        self._words = bitmask_words(vocab_size)
        self._canonical = canonical

    def new_grammar(self) -> LLGuidanceGrammar:
        return LLGuidanceGrammar(self._template.deep_copy(), self._words, self._canonical)


class LLGuidanceGrammar:
    def __init__(self, matcher: llguidance.LLMatcher, bitmask_words: int, canonical: bool) -> None:
        self._matcher = matcher
        self.bitmask_words = bitmask_words
        self._canonical = canonical

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        return bool(self._matcher.consume_tokens(list(token_ids))) and not self._matcher.is_error()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0 and not self._matcher.rollback(num_tokens):
            raise GrammarError(f"cannot roll back {num_tokens} tokens: {_short(self._matcher.get_error())}")

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not target.is_contiguous():
            raise ValueError("a bitmask row must be contiguous int32 on the CPU")
        if target.numel() != self.bitmask_words:
            raise ValueError(f"a bitmask row of {target.numel()} words, not {self.bitmask_words}")
        # llguidance writes the row in place (and drops the GIL meanwhile); the checks above keep it in bounds
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), self.bitmask_words * 4)
        if self._matcher.is_error():  # a limit hit: its mask would allow only EOS, a false "stop"
            raise GrammarError(f"the constraint failed: {_short(self._matcher.get_error())}")

    def forced_tokens(self) -> list[int]:
        # llguidance computes forced tokens only for tokenizers whose tokenization is canonical
        return list(self._matcher.compute_ff_tokens()) if self._canonical else []

    def is_terminated(self) -> bool:
        # is_stopped: nothing but EOS can follow (also true in the error state, which is no completion)
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()


def _to_llguidance(source: GrammarSource) -> str:
    """The llguidance grammar (a Lark string or its JSON form) of a source; GrammarError if malformed."""
    try:
        if source.kind in ("json", "json_object"):
            schema = json.loads(source.text) if source.kind == "json" else {"type": "object"}
            return json_schema_grammar(schema, source)
        if source.kind == "structural_tag":
            return structural_tag_to_lark(json.loads(source.text), lambda schema: json_schema_grammar(schema, source))
        return str(llguidance.grammar_from(_FORMATS[source.kind], source.text))
    except (ValueError, TypeError, KeyError) as exc:  # json.JSONDecodeError is a ValueError
        raise GrammarError(f"invalid {source.kind} constraint: {_short(str(exc))}") from exc


def json_schema_grammar(schema: Any, source: GrammarSource) -> str:
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    if source.no_additional_properties:
        schema = closed_objects(schema)
    options: dict[str, Any] = {"whitespace_flexible": not source.compact_whitespace}
    if source.whitespace_pattern is not None:
        options = {"whitespace_flexible": True, "whitespace_pattern": source.whitespace_pattern}
    return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=cast(Any, options)))


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMAS = (
    "items",
    "prefixItems",
    "additionalItems",
    "contains",
    "not",
    "if",
    "then",
    "else",
    "allOf",
    "anyOf",
    "oneOf",
)


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that lists properties and says nothing about
    others gets `"additionalProperties": false` (vLLM's `disable_additional_properties`)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), (dict, list)):
            out[key] = closed_objects(out[key])
    if "additionalProperties" not in out and isinstance(out.get("properties"), dict):
        out["additionalProperties"] = False
    return out


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."
