"""What a response reports besides its text: `logprobs` / `top_logprobs` (blocking and streaming),
`prompt_logprobs`, `return_tokens_as_token_ids`, `return_token_ids`, and `echo`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion
from wire import MODEL, body, complete, stream, streamed_choices

from loom.engine import AsyncEngine

CAPITAL = "What is the capital of France?"  # greedy: "The capital of France is Paris." then EOS
POEM = "Write a short poem about the sea."


# ---- logprobs --------------------------------------------------------------------------------


def test_logprobs_have_the_openai_shape(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": POEM}], temperature=0, max_tokens=10,
        logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == resp.usage.completion_tokens == 10  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 5
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-4)
        assert entry.bytes is not None and all(0 <= b < 256 for b in entry.bytes)
    # the tokens' bytes spell the text
    assert b"".join(bytes(e.bytes or []) for e in content).decode() == choice.message.content


def test_logprobs_without_top_logprobs_have_empty_top_lists(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(CAPITAL, temperature=0.7, seed=1, max_tokens=6, logprobs=True)
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == resp.usage.completion_tokens  # type: ignore[union-attr]
    assert all(entry.top_logprobs == [] for entry in content)


def test_no_logprobs_unless_asked(chat: Callable[..., ChatCompletion]) -> None:
    resp = chat(CAPITAL, temperature=0, max_tokens=4)
    assert resp.choices[0].logprobs is None


@pytest.mark.parametrize(
    "fields", [{"top_logprobs": 3}, {"logprobs": True, "top_logprobs": 21}], ids=["without-logprobs", "over-20"]
)
def test_bad_top_logprobs_is_422(base_url: str, fields: dict[str, Any]) -> None:
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body(CAPITAL, max_tokens=2, **fields), timeout=60)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == "top_logprobs"


def test_streamed_logprobs_match_the_blocking_ones(base_url: str) -> None:
    fields: dict[str, Any] = {"temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 2}
    blocking = complete(base_url, CAPITAL, **fields)["choices"][0]["logprobs"]["content"]
    chunks = stream(base_url, CAPITAL, return_token_ids=True, **fields)
    streamed = []
    for c in streamed_choices(chunks):
        entries = (c.get("logprobs") or {}).get("content") or []
        assert len(entries) == len(c.get("token_ids") or []), "each chunk's logprobs are its own tokens'"
        streamed.extend(entries)
    assert [e["token"] for e in streamed] == [e["token"] for e in blocking]
    for s, b in zip(streamed, blocking, strict=True):
        assert math.isclose(s["logprob"], b["logprob"], abs_tol=1e-4)
        assert [t["token"] for t in s["top_logprobs"]] == [t["token"] for t in b["top_logprobs"]]


def test_return_tokens_as_token_ids_renders_ids(base_url: str) -> None:
    resp = complete(
        base_url, CAPITAL, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2,
        return_tokens_as_token_ids=True, return_token_ids=True,
    )  # fmt: skip
    choice = resp["choices"][0]
    entries = choice["logprobs"]["content"]
    assert [e["token"] for e in entries] == [f"token_id:{i}" for i in choice["token_ids"]]
    assert all(t["token"].startswith("token_id:") for e in entries for t in e["top_logprobs"])


# ---- prompt_logprobs -------------------------------------------------------------------------


def test_prompt_logprobs_cover_every_prompt_token(base_url: str, engine: AsyncEngine) -> None:
    resp = complete(base_url, CAPITAL, temperature=0, max_tokens=2, prompt_logprobs=3, return_token_ids=True)
    prompt_ids = resp["prompt_token_ids"]
    entries = resp["prompt_logprobs"]
    assert len(entries) == resp["usage"]["prompt_tokens"] == len(prompt_ids)
    assert entries[0] is None
    for token_id, entry in zip(prompt_ids[1:], entries[1:], strict=True):
        assert str(token_id) in entry, "the actual prompt token is always reported"
        actual = entry[str(token_id)]
        assert actual["decoded_token"] == engine.tokenizer.decode([token_id])
        assert actual["logprob"] <= 0 and actual["rank"] >= 1
        assert {1, 2, 3} <= {v["rank"] for v in entry.values()}, "the top 3 are reported with their ranks"
        assert len(entry) == (3 if actual["rank"] <= 3 else 4)


def test_prompt_logprobs_arrive_in_a_stream(base_url: str) -> None:
    chunks = stream(base_url, CAPITAL, temperature=0, max_tokens=2, prompt_logprobs=1, return_token_ids=True)
    prompt_ids = chunks[0]["prompt_token_ids"]
    carried = [chunk["prompt_logprobs"] for chunk in chunks if chunk.get("prompt_logprobs")]
    assert len(carried) == 1
    assert len(carried[0]) == len(prompt_ids) and carried[0][0] is None


def test_prompt_logprobs_over_20_is_422(base_url: str) -> None:
    resp = httpx.post(f"{base_url}/v1/chat/completions", json=body(CAPITAL, prompt_logprobs=21), timeout=60)
    assert resp.status_code == 422, resp.text


# ---- return_token_ids ------------------------------------------------------------------------


def test_return_token_ids_blocking(base_url: str, engine: AsyncEngine) -> None:
    resp = complete(base_url, CAPITAL, temperature=0, max_tokens=5, ignore_eos=True, return_token_ids=True)
    choice = resp["choices"][0]
    assert len(choice["token_ids"]) == resp["usage"]["completion_tokens"] == 5
    assert engine.tokenizer.decode(choice["token_ids"]) == choice["message"]["content"]
    assert len(resp["prompt_token_ids"]) == resp["usage"]["prompt_tokens"]
    plain = complete(base_url, CAPITAL, temperature=0, max_tokens=5)
    assert plain["choices"][0].get("token_ids") is None and plain.get("prompt_token_ids") is None


def test_return_token_ids_streaming(base_url: str) -> None:
    blocking = complete(base_url, CAPITAL, temperature=0, max_tokens=8, return_token_ids=True)
    chunks = stream(base_url, CAPITAL, temperature=0, max_tokens=8, return_token_ids=True)
    assert chunks[0]["prompt_token_ids"] == blocking["prompt_token_ids"]
    assert all(chunk.get("prompt_token_ids") is None for chunk in chunks[1:]), "prompt ids in the first chunk only"
    ids = [i for c in streamed_choices(chunks) for i in (c.get("token_ids") or [])]
    assert ids == blocking["choices"][0]["token_ids"]


# ---- echo ------------------------------------------------------------------------------------

PREFIX = "The capital of France is"
PREFILL = [{"role": "user", "content": CAPITAL}, {"role": "assistant", "content": PREFIX}]
CONTINUE = {"add_generation_prompt": False, "continue_final_message": True}


def test_echo_prepends_the_assistant_message(base_url: str) -> None:
    plain = complete(base_url, PREFILL, temperature=0, max_tokens=8, **CONTINUE)["choices"][0]["message"]["content"]
    echoed = complete(base_url, PREFILL, temperature=0, max_tokens=8, echo=True, **CONTINUE)
    assert echoed["choices"][0]["message"]["content"] == PREFIX + plain


def test_echo_when_streaming(base_url: str) -> None:
    plain = complete(base_url, PREFILL, temperature=0, max_tokens=8, **CONTINUE)["choices"][0]["message"]["content"]
    chunks = stream(base_url, PREFILL, temperature=0, max_tokens=8, echo=True, **CONTINUE)
    text = "".join(c["delta"].get("content") or "" for c in streamed_choices(chunks))
    assert text == PREFIX + plain


def test_echo_ignores_a_last_message_of_another_role(base_url: str) -> None:
    plain = complete(base_url, CAPITAL, temperature=0, max_tokens=6)["choices"][0]["message"]["content"]
    echoed = complete(base_url, CAPITAL, temperature=0, max_tokens=6, echo=True)["choices"][0]["message"]["content"]
    assert echoed == plain
