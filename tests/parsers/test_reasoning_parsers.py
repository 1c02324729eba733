"""Reasoning parsers: `<think>` opened by the model or by the template, DeepSeek-R1, Mistral."""

from __future__ import annotations

import pytest
from parser_cases import parse_every_way

from loom.parsers.reasoning import deepseek_r1, mistral, qwen3

OPEN_PROMPT = "<|im_start|>assistant\n<think>\n"
CLOSED_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_qwen3_model_opens_the_block() -> None:
    text = "<think>\nThe user wants x.\nSo y.\n</think>\n\nThe answer is y."
    assert parse_every_way(qwen3, text, three_way=True) == ("The answer is y.", "The user wants x.\nSo y.", ())


def test_qwen3_without_a_block_is_content_exactly() -> None:
    for text in ("  Hello <think> there </think>", "No thinking.\n", "<thi", "\n\n"):
        assert parse_every_way(qwen3, text) == (text, "", ())


def test_qwen3_template_opened_the_block_so_only_the_end_appears() -> None:
    parse = parse_every_way(lambda: qwen3(prompt_text=OPEN_PROMPT), "Hmm.\n</think>\nAnswer.")
    assert parse == ("Answer.", "Hmm.", ())


def test_a_repeated_opening_marker_is_dropped() -> None:
    assert parse_every_way(lambda: qwen3(prompt_text=OPEN_PROMPT), "\n<think>Hmm.</think>Answer.") == (
        "Answer.",
        "Hmm.",
        (),
    )


def test_a_prompt_that_closed_the_block_leaves_content() -> None:
    assert parse_every_way(lambda: qwen3(prompt_text=CLOSED_PROMPT), "Answer </think>") == ("Answer </think>", "", ())
    assert parse_every_way(lambda: deepseek_r1(prompt_text=CLOSED_PROMPT), "Answer.") == ("Answer.", "", ())


@pytest.mark.parametrize("text", ["Let me think.\n</think>\n\nIt is 4.", "<think>\nLet me think.\n</think>It is 4."])
def test_deepseek_r1_starts_inside_thinking(text: str) -> None:
    assert parse_every_way(deepseek_r1, text) == ("It is 4.", "Let me think.", ())


def test_a_block_that_never_closes_is_all_reasoning() -> None:
    assert parse_every_way(deepseek_r1, "Still thinking </thi") == ("", "Still thinking </thi", ())
    assert parse_every_way(qwen3, "<think>Still thinking\n") == ("", "Still thinking", ())


def test_only_the_first_block_is_reasoning() -> None:
    text = "<think>a</think>b <think>c</think>"
    assert parse_every_way(qwen3, text) == ("b <think>c</think>", "a", ())


def test_mistral_think_markers() -> None:
    assert parse_every_way(mistral, "[THINK]plan[/THINK]answer") == ("answer", "plan", ())


def test_end_marker_split_across_chunks_and_in_reasoning_flag() -> None:
    parser = deepseek_r1()
    assert parser.in_reasoning
    assert parser.feed("abc</th").reasoning == "abc"
    assert parser.in_reasoning
    delta = parser.feed("ink>Answer")
    assert (delta.reasoning, delta.content, parser.in_reasoning) == ("", "Answer", False)


def test_finish_flushes_held_text() -> None:
    parser = qwen3()
    assert not parser.feed("<thi")
    assert parser.finish().content == "<thi"
