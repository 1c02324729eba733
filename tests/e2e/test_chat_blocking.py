"""`POST /v1/chat/completions` without streaming, through the official `openai` SDK.

The response's shape, ids and usage; the length controls (`max_tokens`, `max_completion_tokens`,
`min_tokens`, `ignore_eos`); greedy determinism; `n` and per-request seeds, alone and in a batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai
from openai.types.chat import ChatCompletion

MODEL = "SmolLM2-135M-Instruct"
CAPITAL = "What is the capital of France?"  # the greedy answer ends on EOS after a few tokens
POEM = "Write a short poem about the sea."  # the greedy answer runs past 32 tokens


def test_blocking_completion_has_content_usage_and_ids(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": CAPITAL}], max_tokens=16, temperature=0
    )
    resp = raw.parse()
    assert raw.status_code == 200
    assert raw.headers["x-request-id"]
    assert resp.id and resp.object == "chat.completion"
    assert resp.model == MODEL
    assert resp.system_fingerprint
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    usage = resp.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_request_id_becomes_response_id_and_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": CAPITAL}],
        max_tokens=2,
        extra_body={"request_id": "e2e-req-42"},
    )
    assert raw.headers["x-request-id"] == "e2e-req-42"
    assert raw.parse().id == "e2e-req-42"


def test_model_may_be_omitted(client: openai.OpenAI) -> None:
    resp = client.post(
        "/chat/completions",
        body={"messages": [{"role": "user", "content": CAPITAL}], "max_tokens": 2},
        cast_to=ChatCompletion,
    )
    assert resp.model == MODEL
    assert resp.usage is not None and resp.usage.completion_tokens == 2


def test_greedy_is_deterministic_across_calls(chat: Callable[..., ChatCompletion]) -> None:
    first = chat(POEM, temperature=0, max_tokens=24)
    second = chat(POEM, temperature=0, max_tokens=24)
    assert first.choices[0].message.content == second.choices[0].message.content
    # the second call may reuse the first's KV blocks (prefix caching): only cached_tokens may differ
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (
        second.usage.prompt_tokens,
        second.usage.completion_tokens,
    )


def test_max_tokens_cuts_with_finish_reason_length(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(POEM, temperature=0, max_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


def test_max_completion_tokens_wins_over_max_tokens(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(POEM, temperature=0, max_tokens=20, max_completion_tokens=3)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 3
    resp = chat(POEM, temperature=0, max_tokens=3, max_completion_tokens=7)
    assert resp.usage is not None and resp.usage.completion_tokens == 7


def test_min_tokens_holds_off_eos(chat: Callable[..., ChatCompletion], greedy: Callable[..., ChatCompletion]) -> None:
    natural = greedy(CAPITAL)
    assert natural.choices[0].finish_reason == "stop"  # the premise: it ends early on its own
    assert natural.usage is not None
    min_tokens = natural.usage.completion_tokens + 10
    resp = chat(CAPITAL, temperature=0, max_tokens=60, extra_body={"min_tokens": min_tokens, "ignore_eos": False})
    assert resp.usage is not None
    assert resp.usage.completion_tokens >= min_tokens


def test_ignore_eos_runs_to_max_tokens(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(CAPITAL, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 40


def test_n_returns_indexed_choices_reproducible_by_seed(chat: Callable[..., ChatCompletion]) -> None:
    first = chat(POEM, n=3, temperature=1, seed=1234, max_tokens=16)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert all(texts)
    assert len(set(texts)) > 1, "three sampled choices should not all be the same"
    assert first.usage is not None and first.usage.completion_tokens <= 3 * 16
    second = chat(POEM, n=3, temperature=1, seed=1234, max_tokens=16)
    assert [c.message.content for c in second.choices] == texts


def test_different_seeds_sample_differently(chat: Callable[..., ChatCompletion]) -> None:
    texts = {chat(POEM, temperature=1, seed=seed, max_tokens=16).choices[0].message.content for seed in (1, 2, 3)}
    assert len(texts) > 1


async def test_seeded_request_is_the_same_alone_and_in_a_batch(
    async_client: Callable[[], openai.AsyncOpenAI],
) -> None:
    seeded = {"messages": [{"role": "user", "content": POEM}], "temperature": 1.0, "seed": 7, "max_tokens": 24}
    others = ["Describe a sunset.", "How do airplanes fly?", "Tell me a fun fact about cats.", "List three fruits."]
    async with async_client() as ac:
        alone = await ac.chat.completions.create(model=MODEL, **seeded)
        batch = await asyncio.gather(
            ac.chat.completions.create(model=MODEL, **seeded),
            *(
                ac.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": p}], temperature=1.0, max_tokens=24
                )
                for p in others
            ),
        )
    assert batch[0].choices[0].message.content == alone.choices[0].message.content
    assert batch[0].usage == alone.usage
