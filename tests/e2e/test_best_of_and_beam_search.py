"""How the `n` answers are chosen: `best_of` (the n most likely of best_of samples) and
`use_beam_search` with `length_penalty` (deterministic, sorted by score, with stop / max_tokens /
ignore_eos), blocking and streaming."""

from __future__ import annotations

import math
from typing import Any

import pytest
from wire import complete, post, stream, streamed_text

CAPITAL = "What is the capital of France?"
POEM = "Write a short poem about the sea."


def cumulative(choice: dict[str, Any]) -> float:
    return math.fsum(e["logprob"] for e in choice["logprobs"]["content"])


def texts(resp: dict[str, Any]) -> list[str]:
    return [c["message"]["content"] for c in resp["choices"]]


# ---- best_of ---------------------------------------------------------------------------------

SAMPLED: dict[str, Any] = {"temperature": 1.0, "seed": 1234, "max_tokens": 12, "return_token_ids": True}


def test_best_of_returns_the_most_likely_candidates(base_url: str) -> None:
    """best_of=4 runs the same 4 seeded candidates as n=4 and keeps the 2 with the highest
    cumulative logprob, best first."""
    candidates = complete(base_url, POEM, n=4, logprobs=True, **SAMPLED)["choices"]
    ranked = sorted(candidates, key=cumulative, reverse=True)
    assert len({tuple(c["token_ids"]) for c in candidates}) > 1, "premise: the candidates differ"
    best = complete(base_url, POEM, n=2, best_of=4, **SAMPLED)
    assert [c["token_ids"] for c in best["choices"]] == [c["token_ids"] for c in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"]), "logprobs only when asked"
    assert best["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in candidates), "all 4 ran"


def test_best_of_with_logprobs_shows_them(base_url: str) -> None:
    resp = complete(base_url, POEM, n=1, best_of=3, logprobs=True, **SAMPLED)
    choice = resp["choices"][0]
    assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])


def test_best_of_streams_the_same_answer(base_url: str) -> None:
    blocking = complete(base_url, POEM, n=2, best_of=3, **SAMPLED)
    chunks = stream(base_url, POEM, n=2, best_of=3, **SAMPLED)
    assert [streamed_text(chunks, i) for i in (0, 1)] == texts(blocking)


def test_best_of_below_n_is_422(base_url: str) -> None:
    resp = post(base_url, POEM, n=3, best_of=2, max_tokens=2)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == "best_of"


# ---- beam search -----------------------------------------------------------------------------

BEAM: dict[str, Any] = {"use_beam_search": True, "n": 3, "max_tokens": 8, "logprobs": True, "return_token_ids": True}


def beam_score(choice: dict[str, Any], eos_token_id: int, length_penalty: float) -> float:
    length = len(choice["token_ids"])
    if choice["finish_reason"] == "stop" and choice["token_ids"] and choice["token_ids"][-1] == eos_token_id:
        length -= 1
    return cumulative(choice) / (max(length, 1) ** length_penalty)


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_returns_n_distinct_beams_sorted_by_score(
    base_url: str, engine: Any, length_penalty: float
) -> None:
    resp = complete(base_url, CAPITAL, length_penalty=length_penalty, **BEAM)
    choices = resp["choices"]
    assert len(choices) == 3
    assert len({tuple(c["token_ids"]) for c in choices}) == 3, "the beams are distinct"
    scores = [beam_score(c, engine.tokenizer.eos_token_id, length_penalty) for c in choices]
    assert scores == sorted(scores, reverse=True)
    assert all(len(c["token_ids"]) <= 8 for c in choices)


def test_beam_search_is_deterministic(base_url: str) -> None:
    first = complete(base_url, POEM, **BEAM)
    second = complete(base_url, POEM, temperature=1.0, seed=99, **BEAM)
    assert [c["token_ids"] for c in first["choices"]] == [c["token_ids"] for c in second["choices"]]


def test_beam_search_best_beam_is_at_least_as_likely_as_greedy(base_url: str) -> None:
    greedy = complete(base_url, POEM, temperature=0, max_tokens=8, ignore_eos=True, logprobs=True)
    beams = complete(base_url, POEM, length_penalty=0.0, ignore_eos=True, **BEAM)
    assert cumulative(beams["choices"][0]) >= cumulative(greedy["choices"][0]) - 1e-4


def test_beam_search_with_ignore_eos_runs_to_max_tokens(base_url: str) -> None:
    resp = complete(base_url, CAPITAL, ignore_eos=True, **BEAM)
    assert all(len(c["token_ids"]) == 8 and c["finish_reason"] == "length" for c in resp["choices"])


def test_beam_search_stops_on_a_stop_string(base_url: str) -> None:
    resp = complete(base_url, CAPITAL, stop=["Paris"], **{**BEAM, "max_tokens": 16})
    for choice in resp["choices"]:
        assert "Paris" not in choice["message"]["content"]
    assert any(c["finish_reason"] == "stop" and c["stop_reason"] == "Paris" for c in resp["choices"])


def test_beam_search_streams_the_same_beams(base_url: str) -> None:
    blocking = complete(base_url, CAPITAL, **BEAM)
    chunks = stream(base_url, CAPITAL, **BEAM)
    assert [streamed_text(chunks, i) for i in range(3)] == texts(blocking)


def test_beam_width_is_best_of(base_url: str) -> None:
    resp = complete(base_url, CAPITAL, best_of=4, **{**BEAM, "n": 2})
    assert len(resp["choices"]) == 2


def test_beam_search_with_a_penalty_is_422_naming_it(base_url: str) -> None:
    resp = post(base_url, CAPITAL, use_beam_search=True, n=2, max_tokens=4, frequency_penalty=1.0)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == "frequency_penalty"
