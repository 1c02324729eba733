"""Sampler on hand-made logits: greedy, top-k / top-p / min-p filtering, seeds, min_tokens bans.

Distribution checks draw many rows at once (one request per row) so they stay fast and, with a
fixed global seed, deterministic.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from batch_helpers import admitted_request, sample_output

from loom.engine.request import _MT_STATE_OFFSET, Request, seeded_generator
from loom.engine.sampler import _draw

EOS = 2
VOCAB = 16
NUM_DRAWS = 2000
# probabilities 0.4, 0.3, 0.2, 0.1 on tokens 5, 9, 1, 12; every other token has none
PROBS = {5: 0.4, 9: 0.3, 1: 0.2, 12: 0.1}


@pytest.fixture(autouse=True)
def _seed_global_rng() -> None:
    torch.manual_seed(0)


def make_request(req_id: str = "r", **params: object) -> Request:
    return admitted_request(req_id, (10, 11, 12), VOCAB, EOS, **params)


def peaked_logits() -> torch.Tensor:
    logits = torch.full((VOCAB,), float("-inf"))
    for token, p in PROBS.items():
        logits[token] = torch.tensor(p).log()
    return logits


def random_logits(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(logits_row: torch.Tensor, num: int = NUM_DRAWS, **params: object) -> Counter[int]:
    reqs = [make_request(f"r{i}", **params) for i in range(num)]
    return Counter(sample_output(logits_row.expand(num, -1), reqs).token_ids)


def sample(logits: torch.Tensor, reqs: list[Request]) -> list[int | None]:
    return sample_output(logits, reqs).token_ids


# --- greedy and filters ------------------------------------------------------------------------


def test_temperature_zero_takes_argmax_of_each_row() -> None:
    logits = random_logits(8)
    reqs = [make_request(f"r{i}", temperature=0) for i in range(8)]
    assert sample(logits, reqs) == logits.argmax(dim=-1).tolist()


def test_greedy_rows_take_argmax_beside_sampled_rows() -> None:
    logits = random_logits(6)
    reqs = [make_request(f"r{i}", temperature=0 if i % 2 else 1.5) for i in range(6)]
    for _ in range(20):
        tokens = sample(logits, reqs)
        assert tokens[1::2] == logits[1::2].argmax(dim=-1).tolist()


def test_top_k_one_is_argmax_at_high_temperature() -> None:
    logits = random_logits(1)[0]
    counts = draw_many(logits, temperature=5.0, top_k=1)
    assert set(counts) == {int(logits.argmax())}


def test_small_top_p_keeps_only_the_top_token() -> None:
    counts = draw_many(peaked_logits(), temperature=1.0, top_p=0.05)
    assert set(counts) == {5}


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    counts = draw_many(peaked_logits(), temperature=1.0, top_p=0.65)  # 0.4 + 0.3 >= 0.65
    assert set(counts) == {5, 9}
    assert counts[5] / NUM_DRAWS == pytest.approx(0.4 / 0.7, abs=0.05)


def test_top_k_results_stay_within_the_top_k_set() -> None:
    logits = random_logits(1, seed=3)[0]
    top3 = set(logits.topk(3).indices.tolist())
    counts = draw_many(logits, temperature=10.0, top_k=3)  # nearly flat: all three show up
    assert set(counts) == top3


def test_min_p_drops_tokens_below_fraction_of_top_probability() -> None:
    counts = draw_many(peaked_logits(), temperature=1.0, min_p=0.6)  # threshold 0.24: keeps 0.4, 0.3
    assert set(counts) == {5, 9}
    counts = draw_many(peaked_logits(), temperature=1.0, min_p=0.45)  # threshold 0.18: keeps 0.2 too
    assert set(counts) == {5, 9, 1}


def test_samples_follow_softmax_probabilities() -> None:
    counts = draw_many(peaked_logits(), num=8000, temperature=1.0)
    assert set(counts) == set(PROBS)
    for token, p in PROBS.items():
        assert counts[token] / 8000 == pytest.approx(p, abs=0.02), token


def test_low_temperature_sharpens_the_distribution() -> None:
    counts = draw_many(peaked_logits(), temperature=0.25)  # 0.4^4 : 0.3^4 : ... -> 0.72 on token 5
    assert counts[5] / NUM_DRAWS == pytest.approx(0.72, abs=0.04)


# --- seeds -------------------------------------------------------------------------------------


def seeded_sequence(seed: int, logits: torch.Tensor, steps: int = 30) -> list[int]:
    req = make_request("seeded", temperature=1.0, seed=seed)
    return [sample(logits[None], [req])[0] for _ in range(steps)]


def test_same_seed_gives_same_tokens_across_runs() -> None:
    logits = random_logits(1)[0] / 3  # soft: many tokens are likely
    first = seeded_sequence(1234, logits)
    torch.manual_seed(99)  # the global RNG must not matter
    assert seeded_sequence(1234, logits) == first
    assert len(set(first)) > 3


def test_different_seeds_give_different_tokens() -> None:
    logits = random_logits(1)[0] / 3
    assert seeded_sequence(1, logits) != seeded_sequence(2, logits)


@pytest.mark.parametrize(
    ("seed_a", "seed_b"),
    [(-1, 2**63 - 1), (5, 5 + 2**32), (-(2**63), 0), (123, -123), (2**63 - 1, 2**32 - 1)],
)
def test_seeds_over_the_whole_int64_range_give_distinct_streams(seed_a: int, seed_b: int) -> None:
    # torch's manual_seed keeps only the low 32 bits: each of these pairs would share one stream
    logits = random_logits(1)[0] / 3
    assert seeded_sequence(seed_a, logits) != seeded_sequence(seed_b, logits)


def test_generator_state_layout_is_what_seeded_generator_writes() -> None:
    """`seeded_generator` overwrites torch's mt19937 words in place; a torch upgrade that moves them must fail here."""
    words = [5]
    for i in range(1, 4):  # mt19937's init_genrand(5)
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + i) & 0xFFFF_FFFF)
    state = torch.Generator().manual_seed(5).get_state()
    stored = state[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 32].view(torch.int64).tolist()
    assert stored == words
    assert seeded_generator(-1).initial_seed() == 2**64 - 1


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**63 - 1])
def test_extreme_seeds_are_reproducible(seed: int) -> None:
    logits = random_logits(1)[0] / 3
    assert seeded_sequence(seed, logits) == seeded_sequence(seed, logits)


def test_seeded_row_samples_the_same_alone_or_in_a_batch() -> None:
    logits = random_logits(4) / 3
    alone = seeded_sequence(7, logits[2])

    target = make_request("target", temperature=1.0, seed=7)
    others = [
        make_request("unseeded", temperature=0.8),
        make_request("other-seed", temperature=1.0, seed=8, top_k=5),
        make_request("greedy", temperature=0),
    ]
    batched = []
    for _ in range(len(alone)):
        reqs = [others[0], others[1], target, others[2]]
        batched.append(sample(logits, reqs)[2])
    assert batched == alone


def test_seeded_row_sequence_does_not_depend_on_its_position_in_the_batch() -> None:
    logits = random_logits(3) / 3
    req_a = make_request("a", temperature=1.0, seed=11)
    req_b = make_request("b", temperature=1.0, seed=11)
    seq_a, seq_b = [], []
    for _ in range(20):
        seq_a.append(sample(logits[[0, 1]], [req_a, make_request("x")])[0])
        seq_b.append(sample(logits[[2, 1, 0]], [make_request("y"), make_request("z"), req_b])[2])
    assert seq_a == seq_b


# --- min_tokens --------------------------------------------------------------------------------


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(VOCAB)
    logits[EOS], logits[7], logits[3] = 10.0, 9.0, 8.0  # EOS, then the stop id, then token 3
    req = make_request(temperature=0, min_tokens=2, stop_token_ids=(7,))
    assert sample(logits[None], [req]) == [3]
    req.output_ids.append(3)
    assert sample(logits[None], [req]) == [3]
    req.output_ids.append(3)
    assert sample(logits[None], [req]) == [EOS]  # two tokens out: EOS is allowed again


def test_min_tokens_bans_eos_when_sampling() -> None:
    logits = torch.zeros(VOCAB)
    logits[EOS] = 3.0  # EOS would win about half the draws
    counts = draw_many(logits, temperature=1.0, min_tokens=1)
    assert EOS not in counts
    assert EOS in draw_many(logits, temperature=1.0)


def test_min_tokens_leaves_eos_alone_with_ignore_eos_but_bans_stop_ids() -> None:
    logits = torch.zeros(VOCAB)
    logits[EOS], logits[7] = 10.0, 11.0
    req = make_request(temperature=0, min_tokens=5, ignore_eos=True, stop_token_ids=(7,))
    assert sample(logits[None], [req]) == [EOS]


def test_min_tokens_applies_only_to_its_own_row() -> None:
    logits = torch.zeros(2, VOCAB)
    logits[:, EOS] = 10.0
    reqs = [make_request("banned", temperature=0, min_tokens=3), make_request("free", temperature=0)]
    tokens = sample(logits, reqs)
    assert tokens[0] != EOS and tokens[1] == EOS


@pytest.mark.parametrize("native", [True, False])
def test_top_p_from_candidates_draws_exactly_what_a_full_sort_draws(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Natively, each row's tokens above a threshold are sorted; on the torch path peaked rows are
    decided by their 256 candidates, flatter ones by 4,096, flat rows fall back to the sort. For any
    uniform number each picks the token the reference (the whole vocabulary sorted) picks."""
    from loom.engine import sampler
    from loom.engine.sampler import _TOP_P_CANDIDATES, _draw_nucleus, _draw_sorted
    from loom.models.native import native_top_p_supported

    assert native_top_p_supported()  # the suite runs where the kernels build
    if not native:
        monkeypatch.setattr(sampler, "native_top_p_supported", lambda: False)

    gen = torch.Generator().manual_seed(0)
    vocab = 16384
    logits = torch.cat(
        [
            torch.randn(6, vocab, generator=gen) * 6,
            torch.randn(3, vocab, generator=gen) * 1.5,
            torch.randn(4, vocab, generator=gen) * 0.01,
        ]
    )
    probs = logits.softmax(dim=-1)
    p = torch.tensor([0.95, 0.5, 0.99, 0.1, 0.9999, 0.7, 0.6, 0.5, 0.7, 0.95, 0.5, 0.99, 0.3])
    min_p = torch.tensor([0.0, 0.0, 0.01, 0.0, 0.2, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0, 0.5, 0.0])
    whole, order = probs.sort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(vocab).expand(13, vocab))
    for u in torch.linspace(0, 0.999, 41):
        uniform = torch.full((13,), float(u))
        for mp in (None, min_p):
            drawn, reference = _draw_nucleus(probs, p, uniform, mp), _draw_sorted(whole, order, p, uniform, mp)
            if not native:
                assert torch.equal(drawn, reference)
                continue
            # The kernel's cumulative sums are torch's (double, stored as float); the reference's draw
            # over a whole sorted vocabulary sums blocks first, so there the two agree up to float32
            # summation order: the same token, or its neighbour in the order.
            assert torch.equal(drawn[:9], reference[:9])
            distance = (rank.gather(1, drawn.unsqueeze(1)) - rank.gather(1, reference.unsqueeze(1))).abs()
            assert int(distance.max()) <= 1
    first, second = (probs.topk(k, dim=-1).values.sum(dim=-1) >= p for k in _TOP_P_CANDIDATES)
    # every path was taken: 256 candidates, 4,096, the whole sort
    assert first[:6].any() and not first[6:].any() and second[6:9].all() and not second[9:].any()


@pytest.mark.parametrize("vocab", [49152, 5000])  # whole blocks, and a last block padded
def test_the_two_level_draw_is_the_inverse_cdf_over_a_large_vocabulary(vocab: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    probs = (torch.randn(4, vocab, generator=gen) * 4).softmax(dim=-1)
    probs[1, : vocab // 2] = 0.0  # whole blocks with no mass are stepped over
    probs[2] = 0.0
    probs[2, [3, 1500, vocab - 1]] = torch.tensor([0.25, 0.5, 0.25])  # three tokens, the last in the padded block
    cdf = probs.double().cumsum(dim=-1)
    for u in torch.linspace(0.001, 0.999, 97).tolist():
        uniform = torch.full((4,), u)
        drawn = _draw(probs, uniform)
        expected = torch.searchsorted(cdf, (uniform.double() * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        for row in range(4):
            token = int(drawn[row])
            assert probs[row, token] > 0
            # float32 block sums and float64 cumulative sums may split a boundary differently: one token apart at most
            nonzero = probs[row].nonzero().squeeze(1)
            assert abs(int((nonzero == token).nonzero()) - int((nonzero <= int(expected[row])).sum()) + 1) <= 1
    counts = Counter(int(_draw(probs[2:3], torch.rand(1, generator=gen))) for _ in range(4000))
    assert counts[1500] / 4000 == pytest.approx(0.5, abs=0.03)
    assert counts[3] / 4000 == pytest.approx(0.25, abs=0.03) and counts[vocab - 1] / 4000 == pytest.approx(
        0.25, abs=0.03
    )
