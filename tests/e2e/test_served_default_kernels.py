"""The served default (bf16 with int4 linears from the Q4_1 file: the Q8_0 head and the fused
decode layers where the CPU runs them) through the whole server: prompts longer than one step's
token budget (a prefill chunk that samples nothing), one stream, a batch, and the same greedy
text alone and batched."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import openai
import pytest
from conftest import LiveServer

MODEL = "SmolLM2-135M-Instruct"
STEP_BUDGET = 64
# Fixed rather than timed: a start-up timing on a busy 2-core guest can pick fewer than 3, and 3
# decode rows then take the dense kernels where one row takes int4 (the greedy text can differ)
SMALL_BATCH_ROWS = 4


@pytest.fixture(scope="module")
def served_default(start_server: Callable[..., AbstractContextManager[LiveServer]]) -> Iterator[LiveServer]:
    with start_server(
        dtype="bfloat16", quantization="auto", max_num_batched_tokens=STEP_BUDGET, small_batch_rows=SMALL_BATCH_ROWS
    ) as live:
        yield live


def _client(live: LiveServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key="unused", max_retries=0)


def test_prompts_longer_than_a_step_and_batches_complete(served_default: LiveServer) -> None:
    long_text = "Summarize: " + " ".join(f"item {i} is blue." for i in range(60))  # ~300 tokens: several chunks

    async def run() -> list[openai.types.chat.ChatCompletion]:
        client = _client(served_default)
        asks = [long_text, "What is the capital of France?", "Name a color.", long_text[:200]]
        return await asyncio.gather(*(
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                           max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
            for text in asks
        ))  # fmt: skip

    results = asyncio.run(run())
    assert [r.usage.completion_tokens for r in results if r.usage] == [12, 12, 12, 12]
    assert results[0].usage is not None and results[0].usage.prompt_tokens > 2 * STEP_BUDGET
    assert all(r.choices[0].message.content for r in results)


def test_greedy_text_is_the_same_alone_and_beside_other_streams(served_default: LiveServer) -> None:
    ask = [{"role": "user", "content": "Write a short poem about the sea."}]

    async def run(extra: int) -> str:
        client = _client(served_default)
        # A salt per run: this is about batching, and a prefix-cached prompt's last tokens are
        # computed by other kernels than a cold one's (under load on an Intel AMX guest the
        # second run's first token then differed: "In" against "The")
        salt = {"cache_salt": f"greedy-beside-{extra}"}
        calls = [
            client.chat.completions.create(model=MODEL, messages=ask, max_tokens=24, temperature=0, extra_body=salt)
        ]
        calls += [
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=24, temperature=0.8
            )
            for i in range(extra)
        ]
        return (await asyncio.gather(*calls))[0].choices[0].message.content or ""

    alone = asyncio.run(run(0))
    assert alone and asyncio.run(run(2)) == alone  # 3 decode rows: the same small-batch kernels
    model = served_default.engine.core.runner.model
    assert model.max_small_batch_rows == model.max_small_batch_head_rows == SMALL_BATCH_ROWS
