"""The grammar contract of structured outputs: backend-neutral, four verbs, and the bitmask they fill.

Owns what the core needs from a constraint and nothing about any grammar language:
- `Grammar`: one request's matcher state (and the width of its bitmask rows), with four verbs (vLLM's `StructuredOutputGrammar`):
  `accept_tokens` (advance over sampled tokens), `rollback` (undo the last n), `fill_bitmask`
  (which tokens may come next, one bit per token id), `is_terminated` (nothing but the end can
  follow: the request is complete); and `forced_tokens` for fast-forward (see `core`).
- `CompiledGrammar`: what a backend compiles once from a `GrammarSource` (cached and shared by
  every request that asks for the same constraint); `new_grammar()` gives each request its own
  state.
- `GrammarBackend` and `GrammarBackends`: backends by name, loaded lazily (a Protocol plus a lazy
  registry); the name of one that is missing raises `UnknownGrammarBackend` listing the ones
  available.
- `apply_grammar_bitmask`: the one function that applies filled bitmasks to logits.

A request's grammar has accepted exactly its output tokens. Preemption keeps it as it is: the
recompute re-runs the model over the tokens, never the grammar.

Compiling is slow work with untrusted input: serving runs it off the event loop and off the
engine thread (see `loom/serving/structured.py`). Never parses JSON schemas or regexes itself.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from loom.tokenizer import Tokenizer

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar", "structural_tag"]
DEFAULT_BACKEND = "llguidance"
# name -> module:function building the backend from the tokenizer; imported on first use
_BACKENDS: dict[str, str] = {
    "llguidance": "loom.engine.grammar_llguidance:LLGuidanceBackend",
    "xgrammar": "loom.engine.grammar_xgrammar:XGrammarBackend",
}


class GrammarError(ValueError):
    """A constraint that cannot be compiled (invalid, unsupported or over a limit); the message says why."""


class UnknownGrammarBackend(GrammarError):
    """A backend that is not known or not installed; the message lists the available ones."""


@dataclass(frozen=True, slots=True)
class GrammarSource:
    """A constraint in the words of the wire, ready for any backend.

    `text` is: a JSON schema (json), ignored (json_object), a regex, a JSON list of strings
    (choice), a Lark or GBNF / EBNF grammar (grammar), or a structural tag as JSON
    (structural_tag: `{"format": ...}` or `{"structures": [...], "triggers": [...]}`).
    """

    kind: GrammarKind
    text: str
    compact_whitespace: bool = True  # JSON without optional blanks (a small model cannot loop on them)
    whitespace_pattern: str | None = None  # JSON: the regex optional whitespace must match
    no_additional_properties: bool = False  # JSON: objects without "additionalProperties" get false


class Grammar(Protocol):
    bitmask_words: int  # the width of the bitmask rows it fills: ceil(its vocabulary / 32)

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Advances over `token_ids`; False when one is not allowed (the state is then unusable)."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens."""
        ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes row `row` of `bitmask` (`[N, words]` int32): bit t set = token t may come next."""
        ...

    def is_terminated(self) -> bool:
        """The constraint is complete and allows nothing more (only the end of the sequence)."""
        ...

    def forced_tokens(self) -> list[int]:
        """Fast-forward: the tokens the constraint forces next (fixed keys, punctuation, the rest of
        the one remaining choice), as the model's tokenizer writes them; [] when none or unknown."""
        ...


class CompiledGrammar(Protocol):
    backend: str

    def new_grammar(self) -> Grammar:
        """A fresh state at the start of the constraint, owned by one request."""
        ...


class GrammarBackend(Protocol):
    name: str

    def compile(self, source: GrammarSource) -> CompiledGrammar:
        """Raises `GrammarError` for a constraint it cannot compile. Slow: never call it on the event loop."""
        ...


class GrammarBackends:
    """The backends one tokenizer can use, each built on first use (thread-safe)."""

    def __init__(self, tokenizer: Tokenizer, default: str = DEFAULT_BACKEND) -> None:
        self.tokenizer = tokenizer
        self.default = default
        self._built: dict[str, GrammarBackend] = {}
        self._lock = threading.Lock()

    @staticmethod
    def available() -> tuple[str, ...]:
        """The known backends whose library is installed."""
        return tuple(name for name in _BACKENDS if _factory(name) is not None)

    def get(self, name: str | None = None) -> GrammarBackend:
        name = name or self.default
        with self._lock:
            backend = self._built.get(name)
            if backend is None:
                factory = _factory(name) if name in _BACKENDS else None
                if factory is None:
                    available = ", ".join(self.available()) or "none"
                    raise UnknownGrammarBackend(
                        f"structured-output backend '{name}' is not available on this server (available: {available})"
                    )
                backend = factory(self.tokenizer)
                self._built[name] = backend
            return backend


def _factory(name: str) -> Callable[[Tokenizer], GrammarBackend] | None:
    module_name, _, attr = _BACKENDS[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # the backend's library (or its module here) is not installed
        return None
    factory: Callable[[Tokenizer], GrammarBackend] = getattr(module, attr)
    return factory


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# byte value -> its 8 bits as additive logits: 0 where the bit is set (allowed), -inf where clear
_BYTE_BIAS = torch.where(
    ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf")
)  # [256, 8] float32


def apply_grammar_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Sets to -inf, in place, every token of `logits[rows]` whose bit in `bitmask` is clear.

    `logits` is `[R, vocab]` float32, `rows` `[G]`, `bitmask` `[G, words]` int32 (bit t of row g:
    token t allowed on row rows[g]). Tokens beyond the bitmask's 32 * words are not allowed; bits
    beyond the logits' vocabulary are ignored. The bits become an additive bias (0 or -inf) by
    one table lookup per byte (little-endian: byte b of a word holds its bits 8b..8b+7), several
    times faster on a CPU than unpacking bits and a masked fill.
    """
    num_rows, vocab = logits.shape
    num_grammar = bitmask.shape[0]
    bytes_ = bitmask.contiguous().view(torch.uint8).reshape(-1).long()  # [G * 4 * words]
    bias = _BYTE_BIAS.index_select(0, bytes_).view(num_grammar, -1).to(logits.dtype)  # [G, 32 * words]
    if bias.shape[1] >= vocab:
        bias = bias[:, :vocab]
    else:
        bias = torch.nn.functional.pad(bias, (0, vocab - bias.shape[1]), value=float("-inf"))
    if num_grammar == num_rows:  # build() lists grammar rows in order: all of them is the identity
        logits.add_(bias)
        return
    for g, row in enumerate(rows.tolist()):  # in place, row by row: a gather and scatter costs more
        logits[row].add_(bias[g])
