"""`stream: true`: the SSE chunks as the `openai` SDK and a raw `httpx` reader see them.

A stream must say the same thing as the blocking answer (role first, the same text, the same
finish), carry usage where `stream_options` asks for it, end with `[DONE]`, and be unchanged by
other streams batched beside it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from loom.engine import AsyncEngine

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU does in two sentences.",
    "List three fruits.",
    "Tell me a fun fact about cats.",
    "How do airplanes fly?",
    "What is 2 + 2?",
    "Describe a sunset.",
]


async def collect(ac: openai.AsyncOpenAI, prompt: str, **fields: Any) -> list[ChatCompletionChunk]:
    stream = await ac.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, **fields
    )
    return [chunk async for chunk in stream]


def content_of(chunks: list[ChatCompletionChunk], index: int = 0) -> str:
    return "".join(c.delta.content or "" for chunk in chunks for c in chunk.choices if c.index == index)


def finish_of(chunks: list[ChatCompletionChunk], index: int = 0) -> str | None:
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.index == index and c.finish_reason]
    assert len(finishes) == 1, f"choice {index} finished {len(finishes)} times"
    return finishes[0]


async def test_stream_matches_the_blocking_greedy_answer(
    async_client: Callable[[], openai.AsyncOpenAI], greedy: Callable[..., ChatCompletion]
) -> None:
    for prompt in (PROMPTS[0], PROMPTS[1]):  # one ends on EOS, one on the length cap
        blocking = greedy(prompt)
        async with async_client() as ac:
            chunks = await collect(ac, prompt, temperature=0, max_tokens=32)
        first = chunks[0].choices[0]
        assert first.delta.role == "assistant"
        assert {chunk.id for chunk in chunks} == {chunks[0].id}
        assert all(chunk.model == MODEL and chunk.object == "chat.completion.chunk" for chunk in chunks)
        assert content_of(chunks) == blocking.choices[0].message.content
        assert finish_of(chunks) == blocking.choices[0].finish_reason
        with_choices = [chunk for chunk in chunks if chunk.choices]
        assert with_choices[-1].choices[0].finish_reason is not None, "the last choice chunk carries the finish"
        assert all(chunk.usage is None for chunk in chunks), "no usage unless stream_options asks for it"


async def test_include_usage_sends_a_final_usage_chunk(
    async_client: Callable[[], openai.AsyncOpenAI], greedy: Callable[..., ChatCompletion]
) -> None:
    blocking = greedy(PROMPTS[1])
    async with async_client() as ac:
        chunks = await collect(ac, PROMPTS[1], temperature=0, max_tokens=32, stream_options={"include_usage": True})
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == blocking.usage.prompt_tokens  # type: ignore[union-attr]
    assert last.usage.completion_tokens == blocking.usage.completion_tokens  # type: ignore[union-attr]
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_continuous_usage_stats_puts_usage_on_every_chunk(
    async_client: Callable[[], openai.AsyncOpenAI],
) -> None:
    async with async_client() as ac:
        chunks = await collect(
            ac,
            PROMPTS[1],
            temperature=0,
            max_tokens=12,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    assert all(chunk.usage is not None for chunk in chunks)
    counts = [chunk.usage.completion_tokens for chunk in chunks]  # type: ignore[union-attr]
    assert counts == sorted(counts), "completion_tokens never goes down"
    assert counts[-1] == 12
    assert {chunk.usage.prompt_tokens for chunk in chunks} == {chunks[0].usage.prompt_tokens}  # type: ignore[union-attr]


def test_raw_sse_ends_with_done(base_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPTS[0]}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "request_id": "e2e-sse-1",
    }
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"] == "e2e-sse-1"
        events = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    payloads = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(p["id"] == "e2e-sse-1" for p in payloads)
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"


async def test_n_choices_stream_each_with_role_and_finish(
    async_client: Callable[[], openai.AsyncOpenAI],
) -> None:
    async with async_client() as ac:
        chunks = await collect(ac, PROMPTS[1], n=2, temperature=1, seed=5, max_tokens=8)
    roles = [c.index for chunk in chunks for c in chunk.choices if c.delta.role == "assistant"]
    assert sorted(roles) == [0, 1]
    assert finish_of(chunks, 0) == "length" and finish_of(chunks, 1) == "length"
    assert content_of(chunks, 0) and content_of(chunks, 1)


async def test_concurrent_streams_each_equal_their_solo_greedy_answer(
    async_client: Callable[[], openai.AsyncOpenAI], greedy: Callable[..., ChatCompletion], engine: AsyncEngine
) -> None:
    solo = [greedy(prompt) for prompt in PROMPTS]  # computed one at a time, before the batch
    most_running = 0
    done = threading.Event()

    def watch() -> None:  # proves the streams really shared engine steps
        nonlocal most_running
        while not done.is_set():
            most_running = max(most_running, len(engine.core.scheduler.running))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        async with async_client() as ac:
            streams = await asyncio.gather(*(collect(ac, p, temperature=0, max_tokens=32) for p in PROMPTS))
    finally:
        done.set()
        watcher.join()
    assert most_running > 1, "the streams never ran in one batch"
    for prompt, alone, chunks in zip(PROMPTS, solo, streams, strict=True):
        assert content_of(chunks) == alone.choices[0].message.content, prompt
        assert finish_of(chunks) == alone.choices[0].finish_reason, prompt
    assert len({chunks[0].id for chunks in streams}) == len(PROMPTS), "each stream has its own id"
