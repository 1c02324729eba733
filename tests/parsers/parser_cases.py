"""Shared checks for parser tests: run a parser over a text whole and cut every way, compare.

The result of a run is (content, reasoning, ((name, arguments), ...)): call ids are random, so
they are checked for shape and uniqueness apart from the comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from loom.parsers import ParsedDelta, ParsedOutput, collect

Result = tuple[str, str, tuple[tuple[str, str], ...]]


def run_chunks(parser: Any, chunks: Sequence[str]) -> tuple[ParsedOutput, list[ParsedDelta]]:
    deltas = [parser.feed(chunk) for chunk in chunks]
    deltas.append(parser.finish())
    return collect(deltas), deltas


def result_of(output: ParsedOutput) -> Result:
    return output.content, output.reasoning, tuple((c.name, c.arguments) for c in output.tool_calls)


def check_delta_shape(deltas: Sequence[ParsedDelta]) -> None:
    """OpenAI's streaming shape: indexes in order from 0; id and name on a call's first delta only."""
    seen: list[int] = []
    ids: set[str] = set()
    for delta in deltas:
        for call in delta.tool_calls:
            if call.index in seen:
                assert call.id is None and call.name is None
            else:
                assert call.index == len(seen), "calls are numbered in order from 0"
                assert call.id is not None and call.id.startswith("call_") and len(call.id) > len("call_")
                assert call.name
                assert call.id not in ids
                ids.add(call.id)
                seen.append(call.index)


def chunkings(text: str, *, three_way: bool = False) -> Iterator[list[str]]:
    """Every two-piece cut, one character at a time, and (three_way) every three-piece cut."""
    yield [text]
    yield list(text)
    yield ["", *text, ""]  # empty deltas change nothing
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    if three_way:
        for i in range(1, len(text)):
            for j in range(i + 1, len(text)):
                yield [text[:i], text[i:j], text[j:]]


def parse_every_way(factory: Callable[[], Any], text: str, *, three_way: bool = False) -> Result:
    """The result of `text` fed whole, after checking every chunking gives the very same one."""
    whole, deltas = run_chunks(factory(), [text])
    check_delta_shape(deltas)
    expected = result_of(whole)
    for chunks in chunkings(text, three_way=three_way):
        output, deltas = run_chunks(factory(), chunks)
        check_delta_shape(deltas)
        assert result_of(output) == expected, f"chunks {chunks!r}"
    return expected
