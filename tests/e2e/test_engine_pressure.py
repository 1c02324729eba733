"""A second server whose engine is squeezed: a 16-token step budget (every prompt is prefilled in
chunks) and a KV cache too small for its running requests (some are preempted and recomputed).
Neither may change what greedy decoding says, so each answer must equal the roomy main server's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from loom.engine.request import RequestStatus

MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Write a short poem about the sea.",
    "How do airplanes fly?",
    "Describe a sunset.",
    "Tell me a fun fact about cats.",
]
MAX_TOKENS = 80
STEP_BUDGET = 16
KV_CACHE_GIB = 0.0168  # 24 blocks of 16 tokens for this model: fewer than 4 requests of ~110 tokens need


@pytest.fixture(scope="module")
def squeezed(start_server: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    """A LiveServer (see conftest) of the same model with the squeezed engine."""
    with start_server(max_model_len=256, max_num_batched_tokens=STEP_BUDGET, kv_cache_gib=KV_CACHE_GIB) as live:
        yield live


def reference(chat: Callable[..., ChatCompletion], prompt: str) -> ChatCompletion:
    return chat(prompt, temperature=0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})


async def test_chunked_prefill_and_preemption_keep_greedy_output(
    squeezed: Any, chat: Callable[..., ChatCompletion]
) -> None:
    expected = [reference(chat, p) for p in PROMPTS]  # the main server, one at a time
    sched = squeezed.engine.core.scheduler
    tokens_needed = sum(e.usage.total_tokens for e in expected)  # type: ignore[union-attr]
    assert sched.kv.pool.num_blocks * sched.kv.block_size < tokens_needed, "the cache must be too small"
    assert all(e.usage.prompt_tokens > STEP_BUDGET for e in expected)  # type: ignore[union-attr]

    preempted: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                preempted.update(r.req_id for r in list(sched.waiting) if r.status == RequestStatus.PREEMPTED)
            except RuntimeError:  # the core thread changed the queue mid-copy: look again
                pass
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        async with openai.AsyncOpenAI(
            base_url=f"{squeezed.base_url}/v1", api_key="x", max_retries=0, timeout=600
        ) as ac:
            answers = await asyncio.gather(
                *(
                    ac.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": p}],
                        temperature=0,
                        max_tokens=MAX_TOKENS,
                        extra_body={"ignore_eos": True},
                    )
                    for p in PROMPTS
                )
            )
    finally:
        done.set()
        watcher.join()
    assert preempted, "no request was preempted, so recompute went untested"
    for prompt, want, got in zip(PROMPTS, expected, answers, strict=True):
        assert got.choices[0].message.content == want.choices[0].message.content, prompt
        assert got.usage.prompt_tokens == want.usage.prompt_tokens, prompt  # cached_tokens may differ
        assert got.usage.completion_tokens == want.usage.completion_tokens, prompt
    assert sched.kv.num_free_blocks == sched.kv.pool.num_blocks
    assert not sched.requests


async def test_a_request_larger_than_the_cache_share_still_completes(squeezed: Any) -> None:
    """One request may use the whole context window even when others are queued behind it."""
    async with openai.AsyncOpenAI(base_url=f"{squeezed.base_url}/v1", api_key="x", max_retries=0, timeout=600) as ac:
        long_one = ac.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": PROMPTS[0]}],
            temperature=0,
            max_tokens=256 - 40,
            extra_body={"ignore_eos": True},
        )
        short_ones = [
            ac.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8
            )
            for p in PROMPTS[1:]
        ]
        answers = await asyncio.gather(long_one, *short_ones)
    assert answers[0].choices[0].finish_reason == "length"
    assert all(a.choices[0].message.content for a in answers)
    sched = squeezed.engine.core.scheduler
    assert sched.kv.num_free_blocks == sched.kv.pool.num_blocks
