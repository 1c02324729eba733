"""Request fields beyond length and stopping: sampling filters, chat-template controls, special
tokens in the text, and fields the server accepts without acting on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from loom.engine import AsyncEngine

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = "What is the capital of France?"  # greedy: "The capital of France is Paris." then EOS
POEM = "Write a short poem about the sea."


@pytest.mark.parametrize(
    "fields",
    [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}],
    ids=["top_k=1", "top_p=tiny", "min_p=1"],
)
def test_filters_that_keep_one_token_sample_the_greedy_answer(
    chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion], fields: dict[str, Any]
) -> None:
    want = greedy(POEM, 16).choices[0].message.content
    got = chat(POEM, temperature=1.0, max_tokens=16, extra_body=fields)
    assert got.choices[0].message.content == want


def test_top_k_minus_one_means_off(chat: Callable[..., ChatCompletion]) -> None:
    a = chat(POEM, temperature=1.0, seed=11, max_tokens=16, extra_body={"top_k": -1})
    b = chat(POEM, temperature=1.0, seed=11, max_tokens=16)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_continue_final_message_extends_the_assistant_turn(
    client: openai.OpenAI, greedy: Callable[..., ChatCompletion]
) -> None:
    full = greedy(CAPITAL).choices[0].message.content or ""
    prefix = "The capital of France is"
    assert full.startswith(prefix)  # the premise
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": prefix}],
        max_tokens=16,
        temperature=0,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert prefix + (resp.choices[0].message.content or "") == full


def test_continue_final_message_with_generation_prompt_is_422(client: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": "The"}],
            max_tokens=4,
            extra_body={"add_generation_prompt": True, "continue_final_message": True},
        )
    assert err.value.body["param"] == "continue_final_message"  # type: ignore[index]


def test_special_tokens_show_only_when_asked(chat: Callable[..., ChatCompletion], engine: AsyncEngine) -> None:
    """With ignore_eos the 8th token is EOS, kept as text only with skip_special_tokens=false."""
    eos = engine.tokenizer.eos_token
    assert eos
    hidden = chat(CAPITAL, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    shown = chat(CAPITAL, temperature=0, max_tokens=8, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert eos not in (hidden.choices[0].message.content or "")
    assert (shown.choices[0].message.content or "").endswith(eos)


def test_eos_that_ends_the_answer_is_not_part_of_the_text(
    chat: Callable[..., ChatCompletion], engine: AsyncEngine
) -> None:
    """vLLM's rule: the token that stops a request (EOS here) is not detokenized, whatever
    skip_special_tokens says; only include_stop_str_in_output would keep it."""
    eos = engine.tokenizer.eos_token
    assert eos
    resp = chat(CAPITAL, temperature=0, max_tokens=16, extra_body={"skip_special_tokens": False})
    assert resp.choices[0].finish_reason == "stop"
    assert eos not in (resp.choices[0].message.content or "")


def test_user_and_unknown_extra_fields_are_accepted(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(CAPITAL, max_tokens=2, user="e2e-user", extra_body={"some_future_field": {"x": 1}})
    assert resp.usage is not None and resp.usage.completion_tokens == 2


def test_stream_false_and_n_1_spelled_out_are_plain_requests(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(CAPITAL, max_tokens=2, n=1, stream=False, logprobs=False, frequency_penalty=0, presence_penalty=0)
    assert len(resp.choices) == 1
