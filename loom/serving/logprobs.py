"""Engine logprob records (token ids) -> what a client reads: token text, bytes, top alternatives.

Owns the token's rendering: its text as `tokenizer.decode([id])` (special tokens included), or
`token_id:N` with `return_tokens_as_token_ids`; its `bytes` as the token's own bytes, so a token
that holds only part of a UTF-8 character reports those bytes (its text is then "\ufffd", as
vLLM's). Logprobs below -9999 (a banned token's -inf) are reported as -9999, as vLLM's are, since
JSON has no infinity. Never computes a logprob: the engine does (see loom/engine/logprobs.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from loom.engine.logprobs import TokenLogprob
from loom.serving.types import LogprobEntry, PromptLogprob, PromptLogprobs, TopLogprob
from loom.tokenizer import Tokenizer

MIN_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback tokens


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character table, used by byte-level BPE vocabs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def clamp(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) or logprob < MIN_LOGPROB else logprob


class LogprobFormatter:
    """Renders one request's logprob records; caches each token id's text and bytes."""

    def __init__(self, tokenizer: Tokenizer, tokens_as_ids: bool = False) -> None:
        self._tokenizer = tokenizer
        self._tokens_as_ids = tokens_as_ids
        self._cache: dict[int, tuple[str, tuple[int, ...]]] = {}

    def token(self, token_id: int) -> tuple[str, tuple[int, ...]]:
        """(the token as the client sees it, its bytes)."""
        cached = self._cache.get(token_id)
        if cached is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            shown = f"token_id:{token_id}" if self._tokens_as_ids else text
            cached = self._cache[token_id] = (shown, self._bytes(token_id, text))
        return cached

    def _bytes(self, token_id: int, text: str) -> tuple[int, ...]:
        piece = self._tokenizer.id_to_token(token_id)
        if (byte := _BYTE_TOKEN.fullmatch(piece or "")) is not None:
            return (int(byte.group(1), 16),)
        table = _byte_level_decoder()
        if piece and all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
            try:
                whole = raw.decode("utf-8")
            except UnicodeDecodeError:  # a piece of a character: only the raw bytes say which
                if "\ufffd" in text:
                    return tuple(raw)
            else:
                if whole == text:  # a byte-level vocab (not a SentencePiece one that looks alike)
                    return tuple(raw)
        return tuple(text.encode("utf-8"))

    def entries(self, records: Sequence[TokenLogprob], num_top: int) -> tuple[LogprobEntry, ...]:
        """One entry per generated token, with its `num_top` best alternatives sorted best first."""
        return tuple(self._entry(r, num_top) for r in records)

    def _entry(self, record: TokenLogprob, num_top: int) -> LogprobEntry:
        text, raw = self.token(record.token_id)
        top = sorted(record.top[:num_top], key=lambda pair: -pair[1]) if num_top else []
        return LogprobEntry(text, clamp(record.logprob), raw, tuple(self._top(i, lp) for i, lp in top))

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text, raw = self.token(token_id)
        return TopLogprob(text, clamp(logprob), raw)

    def prompt(self, records: Sequence[TokenLogprob | None]) -> PromptLogprobs:
        return tuple(None if r is None else self._prompt_entry(r) for r in records)

    def _prompt_entry(self, record: TokenLogprob) -> tuple[PromptLogprob, ...]:
        entries = [PromptLogprob(record.token_id, clamp(record.logprob), record.rank, self.token(record.token_id)[0])]
        for rank, (token_id, logprob) in enumerate(record.top, start=1):
            if token_id != record.token_id:
                entries.append(PromptLogprob(token_id, clamp(logprob), rank, self.token(token_id)[0]))
        return tuple(entries)


def cumulative_logprob(records: Sequence[TokenLogprob]) -> float:
    return math.fsum(r.logprob for r in records)
