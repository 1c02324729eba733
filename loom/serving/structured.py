r"""Structured outputs on the serving side: the constraint a request asks for, checked and compiled.

Owns `StructuredOutputSpec` (the one constraint of a request, in serving's words: kind, text,
whitespace options, backend), its limits, and `StructuredOutputCompiler`, which turns a spec into
the engine's `CompiledGrammar`:
- off the event loop and off the engine thread (a small thread pool; llguidance drops the GIL
  while it builds a grammar), within a time budget: past it the request is a 422 and the pool
  thread finishes on its own, bounded by the backend's own fuel limits;
- through a bounded LRU cache of compiled grammars keyed by the spec, so repeated schemas cost
  nothing and a flood of unique ones keeps memory flat (at most `cache_size` grammars held).
Anything wrong with a constraint (malformed, over a limit, unknown backend, does not compile) is
`InvalidRequest` (422, naming the field it came from), raised before any stream starts.
Never touches tensors, never reads HTTP fields (the API converts them into a spec).

Limits (each breach is a 422):
- MAX_SPEC_CHARS = 65,536: the text of a schema, regex, grammar, choice list or structural tag;
- MAX_JSON_DEPTH = 32: nesting of objects and arrays in a JSON schema or structural tag;
- MAX_ENUM_VALUES = 1,024: entries of one `enum` or of a choice list;
- compile budget 5 s by default (`compile_budget_s`), cache of 256 grammars (`cache_size`);
- nested repetition in a regex (`guided_regex`, a schema's `pattern` / `patternProperties`, a
  structural tag's regex): a repeated group holding an unbounded repeat that can start where the
  group starts, as in `(a+)+b` or `(.*a){30}`. A backtracking engine takes exponential time on
  them; llguidance does not, but each token's mask for `(.*a){30}` costs ~10 ms on the engine
  thread, which every request in the batch would wait for. A group that opens with a character
  its inner repeat cannot start with, as in `(\.\d+)+`, is unambiguous and allowed. Patterns
  Python cannot parse are left to the backend; regexes inside Lark grammars are not checked.
JSON modes (json, json_object, JSON inside structural tags) default to compact whitespace: no
optional blanks, so a small model cannot loop on them until max_tokens; a whitespace pattern
opts back in.
"""

from __future__ import annotations

import asyncio
import json
import re
import re._constants as sre  # type: ignore[import-not-found]  # Python's own regex parser: no stubs
import re._parser as sre_parse  # type: ignore[import-not-found]
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from loom.engine.grammar import (
    CompiledGrammar,
    GrammarBackends,
    GrammarError,
    GrammarKind,
    GrammarSource,
    UnknownGrammarBackend,
)
from loom.serving.types import InvalidRequest
from loom.tokenizer import Tokenizer

MAX_SPEC_CHARS = 65_536
MAX_JSON_DEPTH = 32
MAX_ENUM_VALUES = 1_024
BACKEND_ALIASES = {"guidance": "llguidance", "auto": None}  # vLLM's names for the same choices


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    kind: GrammarKind
    text: str  # see `GrammarSource.text`; JSON kinds hold canonical (compact) JSON
    whitespace_pattern: str | None = None  # JSON: optional whitespace allowed, matching this regex
    no_additional_properties: bool = False  # JSON: objects that list properties allow no others
    backend: str | None = None  # None = the server's default
    param: str = field(default="structured_outputs", compare=False)  # the wire field, for errors

    def source(self) -> GrammarSource:
        return GrammarSource(
            self.kind,
            self.text,
            compact_whitespace=self.whitespace_pattern is None,
            whitespace_pattern=self.whitespace_pattern,
            no_additional_properties=self.no_additional_properties,
        )


def check_limits(spec: StructuredOutputSpec) -> None:
    """Raises InvalidRequest when the spec is over a limit or malformed JSON (cheap: size first)."""
    if len(spec.text) > MAX_SPEC_CHARS:
        raise _invalid(spec, f"the constraint is {len(spec.text)} characters long, over the limit of {MAX_SPEC_CHARS}")
    if spec.whitespace_pattern is not None and len(spec.whitespace_pattern) > MAX_SPEC_CHARS:
        raise _invalid(spec, "the whitespace pattern is over the length limit")
    if spec.kind == "regex":
        _check_regex(spec, spec.text)
    if spec.kind not in ("json", "choice", "structural_tag"):
        return
    try:
        value = json.loads(spec.text)
    except (ValueError, RecursionError) as exc:
        raise _invalid(spec, f"the constraint is not valid JSON: {exc}") from exc
    if spec.kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise _invalid(spec, "a choice constraint is a non-empty list of strings")
        if len(value) > MAX_ENUM_VALUES:
            raise _invalid(spec, f"{len(value)} choices, over the limit of {MAX_ENUM_VALUES}")
        return
    if not isinstance(value, dict):
        raise _invalid(spec, "a JSON schema or structural tag must be a JSON object")
    _check_nesting(spec, value)


def _check_nesting(spec: StructuredOutputSpec, root: Any) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]  # iterative: a deep document cannot exhaust the C stack
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _invalid(spec, f"the constraint nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            enum = value.get("enum")
            if isinstance(enum, list) and len(enum) > MAX_ENUM_VALUES:
                raise _invalid(spec, f"an enum of {len(enum)} values, over the limit of {MAX_ENUM_VALUES}")
            if isinstance(value.get("pattern"), str):
                _check_regex(spec, value["pattern"])
            if isinstance(value.get("patternProperties"), dict):
                for pattern in value["patternProperties"]:
                    _check_regex(spec, pattern)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _check_regex(spec: StructuredOutputSpec, pattern: str) -> None:
    if nested_repetition(pattern):
        raise _invalid(
            spec,
            f"the regex {pattern[:80]!r} repeats a group that itself repeats without bound (as in '(a+)+'); "
            "its matching cost can explode: rewrite it without the nested repetition",
        )


_REPEATS = (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT)
_CATEGORIES = {
    "CATEGORY_DIGIT": str.isdigit,
    "CATEGORY_SPACE": str.isspace,
    "CATEGORY_WORD": lambda ch: ch.isalnum() or ch == "_",
}


def nested_repetition(pattern: str) -> bool:
    """Whether `pattern` repeats (more than once) a group whose iterations can split ambiguously: the
    group opens with an unbounded repeat, or ends with one that can match the group's first
    character (see the module docstring)."""
    try:
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return False  # not Python's syntax (e.g. Rust's \p{L}): the backend judges it
    return _nested(list(tree))


def _nested(items: list[Any]) -> bool:
    for op, av in items:
        if op in _REPEATS:
            _, most, body = av
            if most > 1 and _ambiguous_iterations(_unwrapped(list(body))):
                return True
            if _nested(list(body)):
                return True
        elif op == sre.SUBPATTERN and _nested(list(av[-1])):
            return True
        elif op == sre.BRANCH and any(_nested(list(alt)) for alt in av[1]):
            return True
    return False


def _unwrapped(items: list[Any]) -> list[Any]:
    while len(items) == 1 and items[0][0] == sre.SUBPATTERN:
        items = list(items[0][1][-1])
    return items


def _unbounded(item: tuple[Any, Any]) -> bool:
    return item[0] in _REPEATS and item[1][1] == sre.MAXREPEAT


def _ambiguous_iterations(body: list[Any]) -> bool:
    first = _first(body)
    if first is None:
        return False
    if first[0] == sre.BRANCH:
        return any(_ambiguous_iterations(_unwrapped(list(alt))) for alt in first[1][1])
    if _unbounded(first):
        return True
    last, start = _unwrapped([body[-1]])[-1], _first_literal(body)
    return _unbounded(last) and (start is None or _may_start_with(list(last[1][2]), start))


def _first(items: list[Any]) -> tuple[Any, Any] | None:
    while items and items[0][0] == sre.SUBPATTERN:
        items = list(items[0][1][-1])
    return items[0] if items else None


def _first_literal(items: list[Any]) -> int | None:
    first = _first(items)
    return first[1] if first is not None and first[0] == sre.LITERAL else None


def _may_start_with(items: list[Any], code: int) -> bool:
    first = _first(items)
    if first is None:
        return True
    op, av = first
    if op == sre.LITERAL:
        return bool(av == code)
    if op == sre.NOT_LITERAL:
        return bool(av != code)
    if op == sre.ANY:
        return code != ord("\n")
    if op == sre.IN:
        return _in_set(av, chr(code))
    return True  # anything else (a branch, a nested repeat): assume it can


def _in_set(items: list[Any], ch: str) -> bool:
    negate, hit = False, False
    for op, av in items:
        if op == sre.NEGATE:
            negate = True
        elif op == sre.LITERAL:
            hit |= av == ord(ch)
        elif op == sre.RANGE:
            hit |= av[0] <= ord(ch) <= av[1]
        elif op == sre.CATEGORY and str(av).replace("NOT_", "") in _CATEGORIES:
            hit |= _CATEGORIES[str(av).replace("NOT_", "")](ch) != ("NOT_" in str(av))
        else:
            return True
    return hit != negate


class StructuredOutputCompiler:
    """Compiles specs off the event loop with a budget, through a bounded cache. One per served model."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        default_backend: str = "llguidance",
        compile_budget_s: float = 5.0,
        cache_size: int = 256,
        max_workers: int = 2,
    ) -> None:
        self.backends = GrammarBackends(tokenizer, default_backend)
        self.compile_budget_s = compile_budget_s
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[StructuredOutputSpec, str], CompiledGrammar] = OrderedDict()
        self._inflight: dict[tuple[StructuredOutputSpec, str], asyncio.Future[CompiledGrammar]] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="loom-grammar")

    def available_backends(self) -> tuple[str, ...]:
        return self.backends.available()

    def warm_up(self) -> None:
        """Builds the default backend now (llguidance's tokenizer bridge: ~0.6 s for a 50k vocabulary)
        rather than inside the first constrained request's budget. Call it at startup, off the loop."""
        self.backends.get()

    async def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """The spec's compiled grammar; InvalidRequest (422) if it cannot be compiled within budget.

        Requests that ask for the same constraint while it compiles wait for that one compilation
        (32 streams with one schema: one compile, not 32 queued behind the pool's workers)."""
        backend = BACKEND_ALIASES.get(spec.backend, spec.backend) if spec.backend else None
        key = (spec, backend or self.backends.default)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        work = self._inflight.get(key)
        if work is None:
            work = asyncio.ensure_future(self._compile_and_cache(key, spec, backend))
            work.add_done_callback(_retrieve_exception)  # every waiter may have given up
            self._inflight[key] = work
        try:
            return await asyncio.wait_for(asyncio.shield(work), self.compile_budget_s)
        except TimeoutError as exc:
            raise _invalid(spec, f"the constraint did not compile within {self.compile_budget_s:g} s") from exc

    async def _compile_and_cache(
        self, key: tuple[StructuredOutputSpec, str], spec: StructuredOutputSpec, backend: str | None
    ) -> CompiledGrammar:
        try:
            compiled = await asyncio.get_running_loop().run_in_executor(self._pool, self._compile_now, spec, backend)
        finally:
            self._inflight.pop(key, None)
        self._cache[key] = compiled
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def _compile_now(self, spec: StructuredOutputSpec, backend: str | None) -> CompiledGrammar:
        check_limits(spec)
        try:
            return self.backends.get(backend).compile(spec.source())
        except UnknownGrammarBackend as exc:
            param = "guided_decoding_backend" if spec.param.startswith("guided") else spec.param
            raise InvalidRequest(str(exc), param, status_code=422) from exc
        except GrammarError as exc:
            raise _invalid(spec, str(exc)) from exc

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _retrieve_exception(work: asyncio.Future[CompiledGrammar]) -> None:
    if not work.cancelled():
        work.exception()


def _invalid(spec: StructuredOutputSpec, reason: str) -> InvalidRequest:
    return InvalidRequest(f"{spec.param}: {reason}", spec.param, status_code=422)
