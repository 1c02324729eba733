"""Client-side incremental detokenizer: a request's new token ids in, text that is safe to show out.

Owns turning output ids into text step by step (vLLM's prefix/read offset windows, so each step
decodes a few tokens rather than the whole output), holding back a character that is still split
across tokens, and stop strings (holding back text that may turn out to begin one). Never touches
the engine core: when a stop string matches it reports it, and the caller aborts the request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loom.tokenizer import Tokenizer

# What a lossy UTF-8 decode yields for bytes that do not (yet) form a whole character.
_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class DetokenizerDelta:
    text: str  # text safe to emit now
    stop_str: str | None  # the stop string that matched, if any (generation must end)


_NO_DELTA = DetokenizerDelta("", None)


class _StreamDecoder:
    """Token ids -> text, one step at a time, never ending on half a character.

    The output ids are split by two offsets (vLLM's scheme):

        ids: [ .. done .. | prefix_offset .. read_offset | read_offset .. end ]
                            context: already emitted       not yet emitted

    Each step decodes only `ids[prefix_offset:]` and emits what it adds to the decoded context.
    The context is needed because a token's text depends on its neighbours (byte-level pieces of
    one character, SentencePiece's leading space).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, separate_specials: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Only when special tokens are rendered and spaced do they split the ids into segments.
        self._segment_ids = tokenizer.all_special_ids if separate_specials else frozenset()
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text: str | None = None  # decode of ids[prefix_offset:read_offset], cached
        self._emitted_any = False  # some text segment or special token has been emitted
        self._segment_open = False  # the current text segment has emitted text

    def push(self, token_ids: Sequence[int]) -> str:
        if not self._segment_ids:
            self._ids.extend(token_ids)
            return self._read(final=False)
        pieces = []
        for token_id in token_ids:
            if token_id in self._segment_ids:
                pieces.append(self._read(final=True))  # a segment ends whole, even mid-character
                pieces.append(self._special(token_id))
            else:
                self._ids.append(token_id)
        pieces.append(self._read(final=False))
        return "".join(pieces)

    def finish(self) -> str:
        """Releases what is still held, a broken character included (as tokenizer.decode would)."""
        return self._read(final=True)

    def _read(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        # Hold while the window ends mid-character, or adds nothing yet (decode is not always
        # monotonic in the number of tokens, e.g. a lone SentencePiece "▁").
        if not final and (text.endswith(_REPLACEMENT_CHAR) or len(text) <= len(self._prefix_text)):
            return ""
        new_text = text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        return self._spaced_text(new_text)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _spaced_text(self, text: str) -> str:
        # The Hugging Face meaning of spaces_between_special_tokens: " ".join(segments), where a
        # segment is a run of ordinary tokens' text or one special token.
        if not self._segment_ids or not text:
            return text
        if not self._segment_open and self._emitted_any:
            text = " " + text
        self._segment_open = self._emitted_any = True
        return text

    def _special(self, token_id: int) -> str:
        text = self._tokenizer.id_to_token(token_id)
        if self._emitted_any:
            text = " " + text
        self._emitted_any, self._segment_open = True, False
        # The next segment is decoded on its own, with no context across the special token.
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = None
        return text


class _StopMatcher:
    """Text -> text that cannot be part of a stop string, plus the stop string once one matches.

    Invariant: no emitted text begins a stop string that may still complete. The held-back text
    (`_pending`) is the longest suffix of the text so far that is a proper prefix of some stop
    string. With include_stop_str_in_output nothing is held: all text up to and including a
    match is output anyway.

    Matches are searched in `_tail` (the last longest-stop-minus-one characters seen, which hold
    `_pending`) plus the new text, so a stop string may straddle tokens and steps. The first
    stop string to complete wins (the earliest end; the longest on a tie): the same answer
    whatever the chunking, and the earliest match in the usual, non-nested cases.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop if s))
        self._include = include_stop_str_in_output
        self._tail_len = max((len(s) for s in self._stops), default=1) - 1
        holdable = () if include_stop_str_in_output else self._stops
        self._stop_prefixes = frozenset(s[:k] for s in holdable for k in range(1, len(s)))
        self._max_hold = max((len(p) for p in self._stop_prefixes), default=0)
        self._tail = ""
        self._pending = ""

    def feed(self, text: str, final: bool) -> DetokenizerDelta:
        if not self._stops:
            return DetokenizerDelta(text, None) if text else _NO_DELTA
        window = self._tail + text
        emit_from = len(self._tail) - len(self._pending)
        match = self._first_match(window)
        if match is not None:
            start, stop_str = match
            end = start + len(stop_str) if self._include else start
            self._tail = self._pending = ""
            return DetokenizerDelta(window[emit_from:end], stop_str)
        hold = 0 if final else self._held_suffix_len(window)
        emit_to = max(emit_from, len(window) - hold)
        self._pending = window[emit_to:]
        self._tail = window[max(0, len(window) - self._tail_len) :]
        return DetokenizerDelta(window[emit_from:emit_to], None)

    def _first_match(self, window: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -length, stop string)
        for stop_str in self._stops:
            start = window.find(stop_str)
            if start >= 0:
                candidate = (start + len(stop_str), -len(stop_str), stop_str)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, _, stop_str = best
        return end - len(stop_str), stop_str

    def _held_suffix_len(self, window: str) -> int:
        for length in range(min(self._max_hold, len(window)), 0, -1):
            if window[-length:] in self._stop_prefixes:
                return length
        return 0


class IncrementalDetokenizer:
    """One request's output text: feed it each step's new token ids, emit the deltas it returns.

    The concatenation of all deltas equals `tokenizer.decode(all_ids, skip_special_tokens=...)`
    cut at the first stop string (kept when include_stop_str_in_output). After a stop string
    matches, later calls return nothing.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        separate_specials = spaces_between_special_tokens and not skip_special_tokens
        self._decoder = _StreamDecoder(tokenizer, skip_special_tokens, separate_specials)
        self._matcher = _StopMatcher(stop, include_stop_str_in_output)
        self._pieces: list[str] = []
        self._stop_str: str | None = None
        self._finished = False

    @property
    def output_text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]  # join once, not on every access
        return self._pieces[0] if self._pieces else ""

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._stop_str

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        if self._finished:
            return _NO_DELTA
        return self._record(self._matcher.feed(self._decoder.push(new_token_ids), final=False))

    def flush(self) -> str:
        """Ends the output for a reason other than a stop string; returns the text still held."""
        if self._finished:
            return ""
        delta = self._record(self._matcher.feed(self._decoder.finish(), final=True))
        self._finished = True
        return delta.text

    def _record(self, delta: DetokenizerDelta) -> DetokenizerDelta:
        if delta.text:
            self._pieces.append(delta.text)
        if delta.stop_str is not None:
            self._stop_str = delta.stop_str
            self._finished = True
        return delta
