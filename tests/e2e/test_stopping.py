"""Stop strings and stop token ids, blocking and streaming.

Each case first takes the greedy answer, then stops it somewhere in its middle, so the expected
text is a slice of a text the model is known to produce.
"""

from __future__ import annotations

from collections.abc import Callable

import openai
from openai.types.chat import ChatCompletion

from loom.engine import AsyncEngine

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "Describe a sunset."  # a 32-token greedy answer of plain words


def stop_phrase(text: str) -> str:
    """Two adjacent words from the middle of `text`: a stop string that spans several tokens."""
    words = text.split(" ")
    middle = len(words) // 2
    phrase = f"{words[middle]} {words[middle + 1]}"
    assert text.index(phrase) > 0
    return phrase


def test_stop_string_ends_the_text_before_it(
    chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion]
) -> None:
    full = greedy(PROMPT).choices[0].message.content or ""
    stop = stop_phrase(full)
    resp = chat(PROMPT, temperature=0, max_tokens=32, stop=stop)
    choice = resp.choices[0]
    assert choice.message.content == full[: full.index(stop)]
    assert choice.finish_reason == "stop"
    assert getattr(choice, "stop_reason", None) == stop
    assert resp.usage is not None and resp.usage.completion_tokens < 32


def test_first_matching_stop_of_a_list_wins(
    chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion]
) -> None:
    full = greedy(PROMPT).choices[0].message.content or ""
    stop = stop_phrase(full)
    resp = chat(PROMPT, temperature=0, max_tokens=32, stop=["never-in-this-text", stop])
    assert resp.choices[0].message.content == full[: full.index(stop)]
    assert getattr(resp.choices[0], "stop_reason", None) == stop


def test_include_stop_str_in_output_keeps_the_stop_string(
    chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion]
) -> None:
    full = greedy(PROMPT).choices[0].message.content or ""
    stop = stop_phrase(full)
    resp = chat(PROMPT, temperature=0, max_tokens=32, stop=stop, extra_body={"include_stop_str_in_output": True})
    text = resp.choices[0].message.content or ""
    assert text.endswith(stop)
    assert text == full[: full.index(stop) + len(stop)]
    assert resp.choices[0].finish_reason == "stop"


async def test_streamed_stop_string_never_leaks_into_a_chunk(
    async_client: Callable[[], openai.AsyncOpenAI], greedy: Callable[..., ChatCompletion]
) -> None:
    full = greedy(PROMPT).choices[0].message.content or ""
    stop = stop_phrase(full)
    async with async_client() as ac:
        stream = await ac.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPT}],
            temperature=0,
            max_tokens=32,
            stream=True,
            stop=stop,
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.delta.content or "" for chunk in chunks for c in chunk.choices]
    assert "".join(deltas) == full[: full.index(stop)], "no part of the stop string reaches the client"
    assert all(stop not in d for d in deltas)
    finishes = [c for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert [c.finish_reason for c in finishes] == ["stop"]
    assert getattr(finishes[0], "stop_reason", None) == stop


def stop_token(engine: AsyncEngine, text: str) -> tuple[int, str]:
    """A whole-word token from the middle of `text`, and the text before its first occurrence."""
    ids = engine.tokenizer.encode(text)
    for token_id in ids[len(ids) // 2 :]:
        piece = engine.tokenizer.decode([token_id])
        if piece.startswith(" ") and piece.strip().isalpha() and len(piece.strip()) >= 3:
            return token_id, text[: text.index(piece)]
    raise AssertionError(f"no whole-word token in the second half of {text!r}")


def test_stop_token_id_ends_with_it_as_stop_reason(
    chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion], engine: AsyncEngine
) -> None:
    full = greedy(PROMPT).choices[0].message.content or ""
    token_id, before = stop_token(engine, full)
    resp = chat(PROMPT, temperature=0, max_tokens=32, extra_body={"stop_token_ids": [token_id]})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert getattr(choice, "stop_reason", None) == token_id
    text = choice.message.content or ""
    assert text.startswith(before) and len(text) < len(full)
    assert resp.usage is not None and resp.usage.completion_tokens < 32


def test_stop_token_text_is_left_out_unless_include_stop_str_in_output(
    chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion], engine: AsyncEngine
) -> None:
    """vLLM's rule: like a stop string, a stop token's text is cut unless asked for."""
    full = greedy(PROMPT).choices[0].message.content or ""
    token_id, before = stop_token(engine, full)
    piece = engine.tokenizer.decode([token_id])
    cut = chat(PROMPT, temperature=0, max_tokens=32, extra_body={"stop_token_ids": [token_id]})
    assert cut.choices[0].message.content == before
    kept = chat(
        PROMPT,
        temperature=0,
        max_tokens=32,
        extra_body={"stop_token_ids": [token_id], "include_stop_str_in_output": True},
    )
    assert kept.choices[0].message.content == before + piece
    assert cut.usage == kept.usage, "the stop token is generated and counted either way"
