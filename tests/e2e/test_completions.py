"""`POST /v1/completions` on the real model, through the official `openai` SDK's `completions.create`:
blocking and streaming agree, a list of prompts and token-id prompts answer as their solo runs,
echo + logprobs score the prompt the way lm-eval's loglikelihood reads it, an output constraint
holds for every prompt, and a client that leaves a stream aborts every prompt's run.
(scripts/check-lm-eval.sh runs lm-eval itself.)"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


def prompt_ids(base_url: str, text: str) -> list[int]:
    resp = httpx.post(f"{base_url}/tokenize", json={"model": MODEL, "prompt": text, "add_special_tokens": False})
    return list(resp.json()["tokens"])


def test_blocking_and_streaming_give_the_same_greedy_text(client: openai.OpenAI) -> None:
    blocking = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert blocking.object == "text_completion" and blocking.model == MODEL
    choice = blocking.choices[0]
    assert choice.text.strip() and choice.finish_reason in ("stop", "length")
    assert blocking.usage is not None and blocking.usage.completion_tokens <= 6
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == blocking.usage.total_tokens


def test_a_list_of_prompts_and_token_id_prompts_answer_as_their_solo_runs(client: openai.OpenAI, base_url: str) -> None:
    prompts = [PROMPT, "One, two, three,"]
    solo = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0).choices[0].text for p in prompts
    ]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == solo
    ids = [prompt_ids(base_url, p) for p in prompts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0)
    assert [c.text for c in by_ids.choices] == solo


def test_echo_with_logprobs_scores_a_continuation_as_its_generation_did(client: openai.OpenAI, base_url: str) -> None:
    """lm-eval sends context + continuation with echo, logprobs=1, max_tokens=1 and sums the
    continuation's token_logprobs: they must be what the model gave those tokens when it generated them."""
    context = prompt_ids(base_url, PROMPT)
    generated = client.completions.create(
        model=MODEL, prompt=context, max_tokens=3, temperature=0, logprobs=1, extra_body={"return_token_ids": True}
    ).choices[0]
    continuation = generated.model_extra["token_ids"] if generated.model_extra else []
    assert generated.logprobs is not None and len(continuation) == 3
    scored = client.completions.create(
        model=MODEL, prompt=context + continuation, max_tokens=1, temperature=0, logprobs=1, echo=True
    ).choices[0]
    lp = scored.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.token_logprobs) == len(context) + 3 + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert scored.text.startswith(PROMPT + generated.text)
    ctxlen = len(context)
    assert lp.token_logprobs[ctxlen:-1] == pytest.approx(generated.logprobs.token_logprobs, abs=1e-3)
    # greedy tokens are each the most likely at their position: lm-eval's is_greedy holds
    for logprob, top in zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1], strict=True):
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)


def test_streamed_echo_with_logprobs_comes_first_in_each_choice(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL, prompt=[PROMPT, "Hello"], n=2, max_tokens=2, temperature=0, logprobs=0, echo=True, stream=True
    )
    firsts: dict[int, openai.types.CompletionChoice] = {}
    for chunk in stream:
        for c in chunk.choices:
            firsts.setdefault(c.index, c)
    assert sorted(firsts) == [0, 1, 2, 3]
    for index, first in firsts.items():
        assert first.text.startswith([PROMPT, "Hello"][index // 2])
        assert first.logprobs is not None and first.logprobs.token_logprobs is not None
        assert first.logprobs.token_logprobs[0] is None


def test_a_stream_the_client_leaves_aborts_every_prompts_run(base_url: str, wait_idle: Callable[[float], bool]) -> None:
    """1500 tokens each with ignore_eos: far more than a CPU makes before the check, so an engine
    that is idle again aborted both prompts' sequences rather than finishing them."""
    request = {"model": MODEL, "prompt": [PROMPT, "Hello"], "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=request, timeout=300) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk
    assert wait_idle(10.0)


def test_an_output_constraint_holds_for_every_prompt(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL,
        prompt=["Is the sky blue? Answer:", "Is fire cold? Answer:"],
        max_tokens=4,
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.text in ("yes", "no") for c in resp.choices)
