"""Penalties, logit_bias, allowed_token_ids and bad_words on hand-made logits, alone, mixed in a
batch, in their documented order, and together with min_tokens through the sampler.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from batch_helpers import admitted_request, processed, sample_output

from loom.engine.request import Request

EOS = 2
VOCAB = 16
PROMPT = (10, 11, 12)
NEG_INF = float("-inf")


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    torch.manual_seed(0)


def make_request(req_id: str = "r", output_ids: tuple[int, ...] = (), **params: object) -> Request:
    return admitted_request(req_id, PROMPT, VOCAB, EOS, output_ids, **params)


def signed_logits(rows: int = 1) -> torch.Tensor:
    """Token t has logit t - 7.5: negative below 8, positive from 8, no zero."""
    return (torch.arange(VOCAB, dtype=torch.float32) - 7.5).expand(rows, -1).clone()


def sample(logits: torch.Tensor, reqs: list[Request]) -> list[int | None]:
    return sample_output(logits, reqs).token_ids


# --- no-op ------------------------------------------------------------------------------------


def test_requests_without_processors_leave_logits_untouched() -> None:
    logits = signed_logits(2)
    reqs = [make_request("a", output_ids=(3, 3, 9)), make_request("b", temperature=0, min_p=0.1)]
    assert torch.equal(processed(logits, reqs), logits)


# --- penalties --------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    # prompt has 10, 11, 12 (positive logits); output has 3 (negative) and 9 (positive)
    req = make_request(output_ids=(3, 9, 3), repetition_penalty=2.0)
    logits = signed_logits()
    out = processed(logits, [req])[0]
    expected = logits[0].clone()
    for token in (9, 10, 11, 12):
        expected[token] = logits[0, token] / 2.0
    expected[3] = logits[0, 3] * 2.0
    assert torch.equal(out, expected)


def test_frequency_penalty_subtracts_per_generated_occurrence_not_prompt() -> None:
    req = make_request(output_ids=(3, 9, 3, 3), frequency_penalty=0.5)
    logits = signed_logits()
    out = processed(logits, [req])[0]
    diff = logits[0] - out
    assert diff[3] == pytest.approx(1.5) and diff[9] == pytest.approx(0.5)
    diff[[3, 9]] = 0
    assert torch.equal(diff, torch.zeros(VOCAB))  # prompt tokens 10..12 and unseen tokens untouched


def test_presence_penalty_subtracts_once_per_generated_token() -> None:
    req = make_request(output_ids=(3, 9, 3, 3), presence_penalty=0.75)
    logits = signed_logits()
    diff = logits[0] - processed(logits, [req])[0]
    assert diff[3] == pytest.approx(0.75) and diff[9] == pytest.approx(0.75)
    assert int((diff != 0).sum()) == 2


def test_negative_frequency_penalty_encourages_repeats() -> None:
    req = make_request(output_ids=(3, 3), frequency_penalty=-2.0)
    logits = signed_logits()
    assert processed(logits, [req])[0, 3] == pytest.approx(float(logits[0, 3]) + 4.0)


def test_penalty_counts_follow_tokens_appended_between_steps() -> None:
    req = make_request(output_ids=(4,), frequency_penalty=1.0, repetition_penalty=2.0)
    logits = signed_logits()
    first = processed(logits, [req])[0]
    assert first[4] == pytest.approx(-3.5 * 2 - 1) and first[5] == pytest.approx(-2.5)
    req.output_ids.extend([4, 5])
    second = processed(logits, [req])[0]
    assert second[4] == pytest.approx(-3.5 * 2 - 2) and second[5] == pytest.approx(-2.5 * 2 - 1)


def test_penalties_apply_only_to_their_own_rows() -> None:
    reqs = [
        make_request("plain", output_ids=(3, 9)),
        make_request("freq", output_ids=(3, 9), frequency_penalty=1.0),
        make_request("rep", output_ids=(5,), repetition_penalty=1.5),
    ]
    logits = signed_logits(3)
    out = processed(logits, reqs)
    assert torch.equal(out[0], logits[0])
    assert out[1, 3] == logits[1, 3] - 1 and out[1, 9] == logits[1, 9] - 1 and out[1, 5] == logits[1, 5]
    assert out[2, 5] == logits[2, 5] * 1.5 and out[2, 3] == logits[2, 3]


# --- logit_bias, allowed_token_ids, bad_words -------------------------------------------------


def test_logit_bias_adds_to_its_tokens_per_row() -> None:
    reqs = [make_request("a", logit_bias=((1, 5.0), (4, -2.5))), make_request("b", logit_bias=((1, -1.0),))]
    logits = signed_logits(2)
    diff = processed(logits, reqs) - logits
    assert diff[0, 1] == 5.0 and diff[0, 4] == -2.5 and diff[1, 1] == -1.0
    assert int((diff != 0).sum()) == 3


def test_logit_bias_applies_after_penalties() -> None:
    # documented order: (12 - 7.5) / 2 + 1 = 3.25; the other order would give (4.5 + 1) / 2 = 2.75
    req = make_request(repetition_penalty=2.0, logit_bias=((12, 1.0),))
    assert processed(signed_logits(), [req])[0, 12] == pytest.approx(3.25)


def test_allowed_token_ids_mask_every_other_token() -> None:
    reqs = [make_request("a", allowed_token_ids=(0, 7)), make_request("free")]
    logits = signed_logits(2)
    out = processed(logits, reqs)
    assert out[0, 0] == logits[0, 0] and out[0, 7] == logits[0, 7]
    assert torch.isinf(out[0]).sum() == VOCAB - 2
    assert torch.equal(out[1], logits[1])


def test_single_token_bad_word_is_always_banned() -> None:
    req = make_request(bad_words_ids=((15,),))
    out = processed(signed_logits(), [req])[0]
    assert out[15] == NEG_INF and int(torch.isinf(out).sum()) == 1


def test_multi_token_bad_word_bans_last_token_only_after_its_prefix() -> None:
    word = (6, 7, 15)
    for output, banned in [((), False), ((7,), False), ((6, 7, 1), False), ((1, 6, 7), True), ((6, 7), True)]:
        req = make_request(output_ids=output, bad_words_ids=(word,))
        out = processed(signed_logits(), [req])[0]
        assert bool(out[15] == NEG_INF) is banned, output
        assert int(torch.isinf(out).sum()) == int(banned)


def test_bad_words_prefix_is_matched_against_output_not_prompt() -> None:
    req = make_request(bad_words_ids=((PROMPT[-1], 15),))  # the prompt ends with the prefix
    assert processed(signed_logits(), [req])[0, 15] != NEG_INF


# --- through the sampler ----------------------------------------------------------------------


def test_greedy_follows_penalized_logits() -> None:
    logits = signed_logits()  # token 15 is the argmax, 14 the runner-up
    assert sample(logits, [make_request(temperature=0, output_ids=(15,))]) == [15]
    assert sample(logits, [make_request(temperature=0, output_ids=(15,), presence_penalty=1.5)]) == [14]
    assert sample(logits, [make_request(temperature=0, output_ids=(15,), repetition_penalty=1.2)]) == [14]


def test_logit_bias_plus_100_forces_a_token_when_sampling() -> None:
    reqs = [make_request(f"r{i}", temperature=1.0, logit_bias=((3, 100.0),)) for i in range(500)]
    assert set(sample(signed_logits(500), reqs)) == {3}


def test_logit_bias_minus_100_bans_a_token_when_sampling() -> None:
    logits = torch.zeros(500, VOCAB)
    logits[:, 5] = 3.0
    reqs = [make_request(f"r{i}", temperature=1.0, logit_bias=((5, -100.0),)) for i in range(500)]
    counts = Counter(sample(logits, reqs))
    assert 5 not in counts and len(counts) > VOCAB // 2


def test_allowed_token_ids_bound_every_sample() -> None:
    logits = torch.randn(1000, VOCAB) * 3
    reqs = [make_request(f"r{i}", temperature=1.5, allowed_token_ids=(1, 4, 9)) for i in range(1000)]
    assert set(sample(logits, reqs)) == {1, 4, 9}


def test_bad_words_never_sampled() -> None:
    logits = torch.zeros(1000, VOCAB)
    logits[:, 15] = logits[:, 14] = 2.0
    reqs = [
        make_request(f"r{i}", output_ids=(6,), temperature=1.0, bad_words_ids=((15,), (6, 14))) for i in range(1000)
    ]
    counts = Counter(sample(logits, reqs))
    assert 15 not in counts and 14 not in counts and len(counts) == VOCAB - 2


def test_min_tokens_ban_survives_a_plus_100_bias_on_eos() -> None:
    logits = signed_logits()
    req = make_request(temperature=0, min_tokens=1, logit_bias=((EOS, 100.0),), repetition_penalty=1.3)
    assert sample(logits, [req]) == [15]
    req.output_ids.append(15)
    assert sample(logits, [req]) == [EOS]


def test_min_tokens_with_allowed_token_ids_picks_an_allowed_non_eos_token() -> None:
    logits = signed_logits()
    logits[0, EOS] = 50.0
    req = make_request(temperature=0, min_tokens=2, allowed_token_ids=(EOS, 4, 5), frequency_penalty=2.0)
    assert sample(logits, [req]) == [5]
    req.output_ids.append(5)
    assert sample(logits, [req]) == [4]  # 5 was penalized below 4 (-2.5 - 2 < -3.5)


def test_ids_outside_the_vocabulary_are_ignored_not_fatal_to_the_batch() -> None:
    req = make_request(logit_bias=((VOCAB + 3, 5.0), (1, 1.0)), bad_words_ids=((VOCAB,),), allowed_token_ids=(2, VOCAB))
    out = processed(signed_logits(), [req])[0]
    assert out[2] == signed_logits()[0, 2] and int(torch.isinf(out).sum()) == VOCAB - 1
