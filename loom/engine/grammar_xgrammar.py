"""The xgrammar grammar backend (optional): compiles a `GrammarSource` to a matcher per request.

Owns the bridge from Loom's Hugging Face tokenizer to xgrammar's `TokenizerInfo` (built once per
backend, ~1 s for a 50k vocabulary; EOS is its one stop token), the translation of each kind of
constraint into an xgrammar compile call, and the verbs of `Grammar` over `GrammarMatcher`:
- json / json_object: `compile_json_schema`, strict_mode off (objects allow properties the schema
  does not list, as JSON Schema says and llguidance does; `no_additional_properties` closes them).
  Compact whitespace is `any_whitespace=False` with `(",", ":")` separators, which xgrammar applies
  to the schema's own objects and arrays and, since 0.2.9, to free-form values (json_object's, or
  an untyped property; 0.2.8 still took ", " there). A whitespace pattern is a `GrammarError`:
  xgrammar has none;
- regex: `compile_regex` (xgrammar's dialect: no `\\p{..}` classes, no inline flags or named groups);
- choice: an EBNF alternation of the escaped strings;
- grammar: GBNF / EBNF (the text has `::=`; the root rule is `root`) or else Lark (`start`);
- structural_tag: `compile_structural_tag`, both wire forms (the legacy one becomes `triggered_tags`
  as xgrammar itself converts it). Its JSON takes no separators option: compact there means at most
  one blank between tokens (`max_whitespace_cnt: 1`), enough that a small model cannot loop on them.
xgrammar's matcher is "terminated" only once it accepts EOS; Loom's `is_terminated` means nothing
but EOS may follow, so it is computed from the next mask when the grammar is complete (that mask is
then kept for `fill_bitmask`). Compiling drops the GIL but has no fuel limit of its own: serving's
regex checks and time budget bound it. Never decides which constraint a request has (serving does)
and never touches logits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from loom.engine.grammar import GrammarError, GrammarSource, bitmask_words
from loom.engine.grammar_llguidance import closed_objects
from loom.tokenizer import Tokenizer

# xgrammar splits one compile across threads; the engine thread needs the other cores
_MAX_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
_MAX_ERROR_CHARS = 400
_TAG_MAX_BLANKS = 1  # xgrammar refuses 0 (see the module docstring)
_FORMAT_DEPTH = 64  # serving caps a structural tag's JSON nesting at 32 already
# xgrammar's C++ errors open with "[hh:mm:ss] /project/cpp/file.cc:123: " and may hold a check
_LOG_PREFIX = re.compile(r"\[\d\d:\d\d:\d\d\] \S+:\d+: |Check failed: \(.*?\) is false: ")
_COMPILE_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, IndexError)  # pydantic's are ValueErrors


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer) -> None:
        hf = getattr(tokenizer, "hf", None)
        if hf is None:
            raise GrammarError("structured outputs need a Hugging Face fast tokenizer, which this model does not have")
        stop = None if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=tokenizer.vocab_size, stop_token_ids=stop)
        # serving caches compiled grammars with a bound; xgrammar's own cache would grow beside it
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=_MAX_THREADS, cache_enabled=False)
        self.tokenizer = tokenizer
        self._not_stop = _all_bits_but(self.info.stop_token_ids, bitmask_words(self.info.vocab_size))

    def compile(self, source: GrammarSource) -> CompiledXGrammar:
        try:
            compiled = _compile(self.compiler, source)
        except GrammarError:
            raise
        except _COMPILE_ERRORS as exc:  # json.JSONDecodeError is a ValueError
            reason = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise GrammarError(f"{_what(source)}: {_short(reason)}") from exc
        return CompiledXGrammar(compiled, self.tokenizer, self._not_stop)


class CompiledXGrammar:
    backend = "xgrammar"

    def __init__(self, compiled: xgr.CompiledGrammar, tokenizer: Tokenizer, not_stop: torch.Tensor) -> None:
        self._compiled = compiled  # immutable: each request gets its own matcher over it
        self._tokenizer = tokenizer
        self._not_stop = not_stop

    def new_grammar(self) -> XGrammarGrammar:
        return XGrammarGrammar(xgr.GrammarMatcher(self._compiled), self._tokenizer, self._not_stop)


class XGrammarGrammar:
    def __init__(self, matcher: xgr.GrammarMatcher, tokenizer: Tokenizer, not_stop: torch.Tensor) -> None:
        self._matcher = matcher
        self._tokenizer = tokenizer
        self._not_stop = not_stop  # [words] int32, shared and read-only: every bit but the stop tokens'
        self.bitmask_words = not_stop.numel()
        self._next = torch.zeros((1, self.bitmask_words), dtype=torch.int32)  # the next mask, when _next_valid
        self._next_valid = False

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        self._next_valid = False
        return all(self._matcher.accept_token(int(t)) for t in token_ids)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        self._next_valid = False
        try:
            self._matcher.rollback(num_tokens)
        except RuntimeError as exc:
            raise GrammarError(f"cannot roll back {num_tokens} tokens: {_short(str(exc))}") from exc

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        target = bitmask[row]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not target.is_contiguous():
            raise ValueError("a bitmask row must be contiguous int32 on the CPU")
        if target.numel() != self.bitmask_words:
            raise ValueError(f"a bitmask row of {target.numel()} words, not {self.bitmask_words}")
        if self._next_valid:
            target.copy_(self._next[0])
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        if self._matcher.is_terminated():  # it accepted EOS
            return True
        if not self._matcher.is_completed():  # cheap, and false until the constraint could end
            return False
        if not self._next_valid:
            self._matcher.fill_next_token_bitmask(self._next, 0)
            self._next_valid = True
        return not bool((self._next[0] & self._not_stop).any())

    def forced_tokens(self) -> list[int]:
        """The jump-forward string as tokens, checked on the matcher (then rolled back), less its last
        token unless it ends the constraint: the model might have written that one merged with what
        follows. [] when the tokenizer does not give the string back (e.g. a prefix space)."""
        try:
            text = self._matcher.find_jump_forward_string()
        except (RuntimeError, UnicodeDecodeError):  # it may stop inside a character's bytes
            return []
        if not text:
            return []
        token_ids = self._tokenizer.encode(text)
        if self._tokenizer.decode(token_ids) != text:
            return []
        num_accepted = 0
        for t in token_ids:  # a special token (e.g. "<|im_end|>" in a literal) is refused here
            if not self._matcher.accept_token(t):
                break
            num_accepted += 1
        ends = num_accepted == len(token_ids) and self._only_stop_follows()
        if num_accepted:
            self._matcher.rollback(num_accepted)  # the state is as before: a kept next mask stays right
        return token_ids[:num_accepted] if ends else token_ids[: max(num_accepted - 1, 0)]

    def _only_stop_follows(self) -> bool:
        if not self._matcher.is_completed():
            return False
        scratch = torch.zeros((1, self.bitmask_words), dtype=torch.int32)
        self._matcher.fill_next_token_bitmask(scratch, 0)
        return not bool((scratch[0] & self._not_stop).any())


def _compile(compiler: xgr.GrammarCompiler, source: GrammarSource) -> xgr.CompiledGrammar:
    if source.kind in ("json", "json_object"):
        schema = json.loads(source.text) if source.kind == "json" else {"type": "object"}
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object")
        if source.whitespace_pattern is not None:
            raise GrammarError(_NO_WHITESPACE_PATTERN)
        if source.no_additional_properties:
            schema = closed_objects(schema)
        compact = source.compact_whitespace
        return compiler.compile_json_schema(
            json.dumps(schema),
            any_whitespace=not compact,
            separators=(",", ":") if compact else None,
            strict_mode=False,
        )
    if source.kind == "regex":
        return compiler.compile_regex(source.text)
    if source.kind == "choice":
        return compiler.compile_grammar(choice_ebnf(json.loads(source.text)))
    if source.kind == "grammar":
        if "::=" in source.text:
            return compiler.compile_grammar(source.text)
        return compiler.compile_lark(source.text)
    if source.kind == "structural_tag":
        return compiler.compile_structural_tag(structural_tag_json(json.loads(source.text), source))
    raise GrammarError(f"the xgrammar backend has no constraint of kind {source.kind!r}")


_NO_WHITESPACE_PATTERN = (
    "the xgrammar backend cannot take a whitespace pattern (it allows any JSON whitespace or none); "
    "leave the pattern out or choose the llguidance backend"
)


def choice_ebnf(choices: Any) -> str:
    """An EBNF grammar whose root is exactly one of `choices` (a list of strings)."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise GrammarError("a choice constraint is a non-empty list of strings")
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # control characters as escapes, the rest as UTF-8
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def structural_tag_json(tag: Any, source: GrammarSource) -> str:
    """xgrammar's structural tag JSON for either wire form, with the source's JSON options applied."""
    if not isinstance(tag, dict):
        raise GrammarError("a structural tag must be a JSON object")
    if "format" in tag:
        fmt = tag["format"]
    else:  # the legacy form, as xgrammar's StructuralTag.from_legacy_structural_tag converts it
        tags = [
            {"type": "tag", "begin": s["begin"], "content": _legacy_content(s), "end": s["end"]}
            for s in tag["structures"]
        ]
        fmt = {"type": "triggered_tags", "triggers": tag["triggers"], "tags": tags}
    return json.dumps({"type": "structural_tag", "format": _json_options(fmt, source, 0)})


def _legacy_content(structure: dict[str, Any]) -> dict[str, Any]:
    schema = structure.get("schema")
    return {"type": "any_text"} if schema is None else {"type": "json_schema", "json_schema": schema}


def _json_options(value: Any, source: GrammarSource, depth: int) -> Any:
    """A copy of a format tree whose `json_schema` formats take the source's whitespace and
    additional-properties options (schemas themselves are not walked)."""
    if depth > _FORMAT_DEPTH:
        raise GrammarError(f"the structural tag nests deeper than {_FORMAT_DEPTH} levels")
    if isinstance(value, list):
        return [_json_options(v, source, depth + 1) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: v if k == "json_schema" else _json_options(v, source, depth + 1) for k, v in value.items()}
    if out.get("type") == "json_schema" and "json_schema" in out:
        if source.whitespace_pattern is not None:
            raise GrammarError(_NO_WHITESPACE_PATTERN)
        if source.no_additional_properties:
            out["json_schema"] = closed_objects(out["json_schema"])
        if source.compact_whitespace:
            out.setdefault("max_whitespace_cnt", _TAG_MAX_BLANKS)
    return out


def _all_bits_but(token_ids: Sequence[int], words: int) -> torch.Tensor:
    bits = torch.ones(words * 32, dtype=torch.int64)
    bits[[t for t in token_ids if 0 <= t < words * 32]] = 0
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # [words]: the same 32 bits, as int32


def _what(source: GrammarSource) -> str:
    if source.kind != "grammar":
        return f"invalid {source.kind} constraint"
    dialect = "GBNF / EBNF" if "::=" in source.text else "Lark"
    return f"xgrammar could not read this {dialect} grammar"


def _short(message: str) -> str:
    message = " ".join(_LOG_PREFIX.sub("", message).split())
    return message if len(message) <= _MAX_ERROR_CHARS else message[: _MAX_ERROR_CHARS - 3] + "..."
