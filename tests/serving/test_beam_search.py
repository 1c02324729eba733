"""Serving-level beam search over a toy engine: exact against brute force when the beam is wide,
and, at any width, deterministic, sorted by score, and true to stop / min_tokens / ignore_eos."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from toy_engine import EOS, ToyEngine, toy_logprobs

from loom.engine import SamplingParams
from loom.serving.beam_search import BeamSearch, BeamSearchSpec, score

PROMPT = (0, 1, 2)


def spec(width: int, max_tokens: int = 3, length_penalty: float = 1.0, **sampling: Any) -> BeamSearchSpec:
    return BeamSearchSpec(
        req_id="r", prompt_ids=PROMPT, sampling=SamplingParams(max_tokens=max_tokens, **sampling), width=width,
        length_penalty=length_penalty, max_tokens=max_tokens, num_logprobs=2 * width,
    )  # fmt: skip


def brute_force(max_tokens: int, length_penalty: float) -> list[tuple[tuple[int, ...], float]]:
    """Every finished sequence (EOS-ended or max_tokens long) with its score, best first."""
    finished = []
    for length in range(1, max_tokens + 1):
        for seq in itertools.product(range(5), repeat=length):
            if EOS in seq[:-1]:
                continue
            cum = math.fsum(dict(toy_logprobs(PROMPT + seq[:i]))[t] for i, t in enumerate(seq))
            if seq[-1] == EOS:
                finished.append((seq, cum / max(length - 1, 1) ** length_penalty))
            elif length == max_tokens:
                finished.append((seq, cum / length**length_penalty))
    return sorted(finished, key=lambda pair: -pair[1])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
async def test_a_wide_beam_finds_the_exact_best_sequences(length_penalty: float) -> None:
    found = await BeamSearch(ToyEngine(), spec(width=64, length_penalty=length_penalty)).run()  # type: ignore[arg-type]
    expected = brute_force(3, length_penalty)[:5]
    got = [(b.token_ids, score(b, length_penalty)) for b in found.beams[:5]]
    assert [seq for seq, _ in got] == [seq for seq, _ in expected]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected])


@pytest.mark.parametrize("width", [1, 2, 3])
async def test_beams_are_distinct_sorted_and_deterministic(width: int) -> None:
    first = await BeamSearch(ToyEngine(), spec(width, max_tokens=6)).run()  # type: ignore[arg-type]
    again = await BeamSearch(ToyEngine(), spec(width, max_tokens=6)).run()  # type: ignore[arg-type]
    assert first.beams == again.beams
    assert len(first.beams) == width
    assert len({b.token_ids for b in first.beams}) == width
    scores = [score(b, 1.0) for b in first.beams]
    assert scores == sorted(scores, reverse=True)


async def test_width_one_is_greedy_decoding() -> None:
    found = await BeamSearch(ToyEngine(), spec(1, max_tokens=5, ignore_eos=True)).run()  # type: ignore[arg-type]
    context = list(PROMPT)
    for _ in range(5):
        context.append(toy_logprobs(context)[0][0])
    assert found.beams[0].token_ids == tuple(context[len(PROMPT) :])


async def test_ignore_eos_runs_every_beam_to_max_tokens() -> None:
    found = await BeamSearch(ToyEngine(), spec(3, max_tokens=4, ignore_eos=True)).run()  # type: ignore[arg-type]
    assert all(len(b.token_ids) == 4 and b.finish_reason == "length" for b in found.beams)


async def test_min_tokens_keeps_eos_out_of_the_first_tokens() -> None:
    found = await BeamSearch(ToyEngine(), spec(8, max_tokens=4, min_tokens=2)).run()  # type: ignore[arg-type]
    for beam in found.beams:
        assert EOS not in beam.token_ids[:2]


async def test_a_stop_string_finishes_a_beam_and_is_cut_from_its_text() -> None:
    found = await BeamSearch(ToyEngine(), spec(16, max_tokens=4, stop=("b",))).run()  # type: ignore[arg-type]
    stopped = [b for b in found.beams if b.stop_reason == "b"]
    assert stopped
    for beam in found.beams:
        assert "b" not in beam.text
    for beam in stopped:
        assert beam.finish_reason == "stop" and beam.token_ids[-1] == 1


async def test_eos_is_not_part_of_the_text_and_not_scored() -> None:
    found = await BeamSearch(ToyEngine(), spec(64, max_tokens=3)).run()  # type: ignore[arg-type]
    ended = [b for b in found.beams if b.token_ids[-1:] == (EOS,)]
    assert ended
    for beam in ended:
        assert beam.finish_reason == "stop" and beam.stop_reason is None
        assert "</s>" not in beam.text
        assert beam.num_scored == len(beam.token_ids) - 1


async def test_every_step_asks_one_token_with_the_candidates() -> None:
    engine = ToyEngine()
    found = await BeamSearch(engine, spec(2, max_tokens=3, ignore_eos=True)).run()  # type: ignore[arg-type]
    assert all(p.max_tokens == 1 and p.logprobs == 4 and p.greedy for _, _, p in engine.requests)
    assert found.num_generated_tokens == len(engine.requests) == 1 + 2 + 2
