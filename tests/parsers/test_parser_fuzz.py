"""Random texts built from each format's own pieces: no parser raises, every chunking gives the
whole text's result, and an output with no call comes back from a tool parser exactly as written."""

from __future__ import annotations

import random

import pytest
from parser_cases import check_delta_shape, result_of, run_chunks

from loom.parsers import get_reasoning_parser, get_tool_parser, reasoning_parser_names, tool_parser_names

PIECES = [
    "<tool_call>", "</tool_call>", "<|python_tag|>", "<|python_start|>", "<|python_end|>", "[TOOL_CALLS]",
    "[ARGS]", "[CALL_ID]", "<think>", "</think>", "[THINK]", "[/THINK]", '{"name": "f", "arguments": {"a": 1}}',
    '{"name": "g", "parameters": {}}', '[{"name": "h", "arguments": {}}]', "[f(a=1)]", "get(x='y')", "{", "}",
    "[", "]", '"', "'", ";", ",", " ", "\n", "<", "hello", "f", "é", "\\",
]  # fmt: skip


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize(
    "factory",
    [get_tool_parser(n) for n in tool_parser_names()] + [get_reasoning_parser(n) for n in reasoning_parser_names()],
)
def test_random_texts_agree_in_every_chunking(factory) -> None:  # noqa: ANN001
    rng = random.Random(1234)
    is_tool_parser = factory in [get_tool_parser(n) for n in tool_parser_names()]
    for _ in range(300):
        text = random_text(rng)
        whole, deltas = run_chunks(factory(), [text])
        check_delta_shape(deltas)
        if is_tool_parser and not whole.tool_calls:
            assert whole.content == text
        for _ in range(4):
            chunks = random_chunks(rng, text)
            output, deltas = run_chunks(factory(), chunks)
            check_delta_shape(deltas)
            assert result_of(output) == result_of(whole), chunks
