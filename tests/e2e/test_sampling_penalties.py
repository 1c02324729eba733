"""Penalties, biases and token masks through the real server: each test fails if its field were ignored.

`logit_bias`, `bad_words`, `allowed_token_ids`, `presence_penalty`, `frequency_penalty`,
`repetition_penalty`, `min_tokens` together with them, `repetition_detection`, and the 422s for
values the model cannot honor (ids outside the vocabulary, biases outside -100..100).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from wire import complete, post, stream

from loom.engine import AsyncEngine

CAPITAL = "What is the capital of France?"  # greedy: "The capital of France is Paris." then EOS
POEM = "Write a short poem about the sea."
REPEAT = "Say the word 'hello' over and over again, at least twenty times."
SUNSET = "Describe a sunset."


def token_ids_of(resp: dict[str, Any]) -> list[list[int]]:
    return [choice["token_ids"] for choice in resp["choices"]]


def first_token(engine: AsyncEngine, text: str) -> int:
    return engine.tokenizer.encode(text)[0]


def contains_run(ids: list[int], run: list[int]) -> bool:
    return any(ids[i : i + len(run)] == run for i in range(len(ids) - len(run) + 1))


def error_param(resp: httpx.Response) -> str | None:
    return resp.json()["error"]["param"]  # type: ignore[no-any-return]


# ---- logit_bias ------------------------------------------------------------------------------


def test_logit_bias_plus_100_makes_every_token_that_token(base_url: str, engine: AsyncEngine) -> None:
    forced = first_token(engine, " ocean")
    resp = complete(
        base_url, POEM, temperature=1.0, max_tokens=8, n=2, logit_bias={str(forced): 100}, return_token_ids=True
    )
    assert token_ids_of(resp) == [[forced] * 8, [forced] * 8]
    assert all(c["finish_reason"] == "length" for c in resp["choices"])


def test_logit_bias_is_honored_when_streaming(base_url: str, engine: AsyncEngine) -> None:
    forced = first_token(engine, " ocean")
    chunks = stream(base_url, POEM, temperature=1.0, max_tokens=6, logit_bias={str(forced): 100}, return_token_ids=True)
    ids = [i for chunk in chunks for c in chunk["choices"] for i in (c.get("token_ids") or [])]
    assert ids == [forced] * 6


def test_logit_bias_minus_100_bans_the_greedy_token(base_url: str) -> None:
    plain = complete(base_url, CAPITAL, temperature=0, max_tokens=4, return_token_ids=True)
    banned = plain["choices"][0]["token_ids"][0]
    biased = complete(
        base_url, CAPITAL, temperature=0, max_tokens=4, logit_bias={str(banned): -100}, return_token_ids=True
    )
    assert banned not in biased["choices"][0]["token_ids"]


def test_min_tokens_holds_against_a_bias_towards_eos(base_url: str, engine: AsyncEngine) -> None:
    """EOS is all but forced by the bias, yet min_tokens still bans it for the first 5 tokens."""
    eos = engine.tokenizer.eos_token_id
    resp = complete(
        base_url, CAPITAL, temperature=1.0, seed=3, max_tokens=32, min_tokens=5, logit_bias={str(eos): 100},
        return_token_ids=True,
    )  # fmt: skip
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert resp["usage"]["completion_tokens"] == 6
    assert choice["token_ids"][-1] == eos and eos not in choice["token_ids"][:-1]


@pytest.mark.parametrize(
    ("bias", "why"),
    [({"999999": 1}, "outside the vocabulary"), ({"abc": 1}, "not a token id"), ({"5": 150}, "over 100")],
    ids=["outside-vocab", "not-an-id", "over-100"],
)
def test_bad_logit_bias_is_422_naming_it(base_url: str, bias: dict[str, float], why: str) -> None:
    resp = post(base_url, CAPITAL, max_tokens=2, logit_bias=bias)
    assert resp.status_code == 422, (why, resp.text)
    assert error_param(resp) == "logit_bias"


# ---- allowed_token_ids and bad_words ---------------------------------------------------------


def test_allowed_token_ids_bound_every_output_token(base_url: str, engine: AsyncEngine) -> None:
    allowed = sorted({first_token(engine, w) for w in (" the", " sea", " blue", " waves", ",", ".")})
    resp = complete(
        base_url, POEM, temperature=1.0, seed=5, n=4, max_tokens=16, allowed_token_ids=allowed, return_token_ids=True
    )
    for ids in token_ids_of(resp):
        assert ids and set(ids) <= set(allowed), ids


@pytest.mark.parametrize("ids", [[-1], [10**7]], ids=["negative", "outside-vocab"])
def test_allowed_token_ids_outside_the_vocabulary_is_422(base_url: str, ids: list[int]) -> None:
    resp = post(base_url, CAPITAL, max_tokens=2, allowed_token_ids=ids)
    assert resp.status_code == 422, resp.text
    assert error_param(resp) == "allowed_token_ids"


def test_bad_words_never_appear_over_many_samples(base_url: str, engine: AsyncEngine) -> None:
    words = ["Paris", "France"]
    runs = [engine.tokenizer.encode(text) for w in words for text in (w, " " + w)]
    fields: dict[str, Any] = {"temperature": 0.8, "seed": 7, "n": 6, "max_tokens": 24, "return_token_ids": True}
    plain = complete(base_url, CAPITAL, **fields)
    assert any(contains_run(ids, run) for ids in token_ids_of(plain) for run in runs), "premise: the words come up"
    banned = complete(base_url, CAPITAL, bad_words=words, **fields)
    for ids in token_ids_of(banned):
        assert not any(contains_run(ids, run) for run in runs), engine.tokenizer.decode(ids)


def test_bad_words_hold_when_streaming(base_url: str, engine: AsyncEngine) -> None:
    chunks = stream(base_url, CAPITAL, temperature=0, max_tokens=24, bad_words=["Paris"], return_token_ids=True)
    ids = [i for chunk in chunks for c in chunk["choices"] for i in (c.get("token_ids") or [])]
    for run in (engine.tokenizer.encode("Paris"), engine.tokenizer.encode(" Paris")):
        assert not contains_run(ids, run)


# ---- penalties -------------------------------------------------------------------------------


def greedy_ids(base_url: str, prompt: str = REPEAT, **fields: Any) -> list[int]:
    resp = complete(base_url, prompt, temperature=0, max_tokens=40, ignore_eos=True, return_token_ids=True, **fields)
    return resp["choices"][0]["token_ids"]  # type: ignore[no-any-return]


def test_frequency_penalty_reduces_repeats(base_url: str) -> None:
    plain = greedy_ids(base_url)
    penalized = greedy_ids(base_url, frequency_penalty=2.0)
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))


def test_presence_penalty_changes_the_output(base_url: str) -> None:
    plain = greedy_ids(base_url)
    penalized = greedy_ids(base_url, presence_penalty=2.0)
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))


def test_repetition_penalty_reduces_repeats(base_url: str) -> None:
    plain = greedy_ids(base_url)
    penalized = greedy_ids(base_url, repetition_penalty=1.8)
    assert penalized != plain
    assert len(set(penalized)) > len(set(plain))


def test_negative_frequency_penalty_encourages_repeats(base_url: str) -> None:
    plain = greedy_ids(base_url, prompt=SUNSET)  # varied text to begin with
    encouraged = greedy_ids(base_url, prompt=SUNSET, frequency_penalty=-2.0)
    assert len(set(encouraged)) < len(set(plain))


# ---- repetition_detection --------------------------------------------------------------------


def test_repetition_detection_ends_a_loop_early(base_url: str, engine: AsyncEngine) -> None:
    forced = first_token(engine, " hello")
    resp = complete(
        base_url, REPEAT, temperature=0, max_tokens=32, logit_bias={str(forced): 100},
        repetition_detection={"max_pattern_size": 3, "min_count": 4},
    )  # fmt: skip
    choice = resp["choices"][0]
    assert resp["usage"]["completion_tokens"] == 4  # a 1-token pattern seen 4 times
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == "repetition_detected"


def test_repetition_detection_off_when_max_pattern_size_is_0(base_url: str, engine: AsyncEngine) -> None:
    forced = first_token(engine, " hello")
    resp = complete(
        base_url, REPEAT, temperature=0, max_tokens=12, logit_bias={str(forced): 100},
        repetition_detection={"max_pattern_size": 0},
    )  # fmt: skip
    assert resp["usage"]["completion_tokens"] == 12


def test_inconsistent_repetition_detection_is_422(base_url: str) -> None:
    resp = post(base_url, CAPITAL, max_tokens=2, repetition_detection={"max_pattern_size": 2, "min_count": 1})
    assert resp.status_code == 422, resp.text
