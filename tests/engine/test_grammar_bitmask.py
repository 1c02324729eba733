"""The grammar bitmask in the sampler: where it sits in the order of operations, on hand-made logits.

A row's bitmask bans every token whose bit is clear, before min_tokens, penalties, logit_bias,
allowed_token_ids and bad words; -inf is absorbing, so nothing after it (a +100 bias included)
revives a masked token; logprobs stay the raw model distribution; rows without a grammar are
untouched.
"""

from __future__ import annotations

import pytest
import torch
from batch_helpers import admitted_request, build_batch

from loom.engine.grammar import apply_grammar_bitmask, bitmask_words
from loom.engine.request import Request
from loom.engine.sampler import Sampler

EOS = 2
VOCAB = 40  # two bitmask words: the second one is partly past the vocabulary
PROMPT = (10, 11, 12)


def bitmask(allowed: set[int], words: int = bitmask_words(VOCAB)) -> torch.Tensor:
    bits = torch.zeros(words * 32, dtype=torch.int64)
    bits[list(allowed)] = 1
    packed = (bits.view(words, 32) << torch.arange(32)).sum(dim=1)
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32)  # the same 32 bits, as int32


def make_request(req_id: str = "r", **params: object) -> Request:
    return admitted_request(req_id, PROMPT, VOCAB, EOS, **params)


def sample(logits: torch.Tensor, reqs: list[Request], masks: list[torch.Tensor | None]) -> list[int | None]:
    with torch.inference_mode():
        return Sampler().sample(logits.clone(), build_batch(reqs, masks)).token_ids


def test_apply_grammar_bitmask_bans_cleared_bits_and_tokens_past_the_mask() -> None:
    logits = torch.zeros(3, VOCAB)
    apply_grammar_bitmask(logits, torch.tensor([0, 2]), torch.stack([bitmask({1, 33}), bitmask({5, 63})]))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [1, 33]
    assert torch.isfinite(logits[1]).all()  # no grammar on row 1
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [5]  # bit 63 is past the vocabulary
    narrow = torch.zeros(1, VOCAB)
    apply_grammar_bitmask(narrow, torch.tensor([0]), bitmask({5, 31}, words=1))
    assert torch.isfinite(narrow[0]).nonzero().flatten().tolist() == [5, 31]  # tokens past the mask: banned


def test_greedy_and_sampled_rows_only_ever_take_allowed_tokens() -> None:
    logits = torch.randn(200, VOCAB) * 4
    allowed = {3, 17, 35}
    reqs = [make_request(f"r{i}", temperature=0 if i % 2 else 1.3) for i in range(200)]
    tokens = sample(logits, reqs, [bitmask(allowed)] * 200)
    assert set(tokens) <= allowed
    assert len(set(tokens)) == 3


def test_plus_100_logit_bias_cannot_revive_a_masked_token() -> None:
    logits = torch.zeros(1, VOCAB)
    req = make_request(temperature=0, logit_bias=((7, 100.0),))
    assert sample(logits, [req], [bitmask({4, 5})]) in ([4], [5])
    assert sample(logits, [req], [None]) == [7]


def test_mask_meets_min_tokens_allowed_ids_and_penalties_in_order() -> None:
    logits = torch.arange(VOCAB, dtype=torch.float32).unsqueeze(0)  # higher id, higher logit
    req = make_request(
        temperature=0, min_tokens=1, stop_token_ids=(30,), allowed_token_ids=(EOS, 20, 30, 31), presence_penalty=2.0
    )
    mask = bitmask({EOS, 20, 30, 31, 32})
    assert sample(logits, [req], [mask]) == [31]  # 32 not in allowed ids; 30 a stop id below min_tokens
    req.output_ids.append(31)
    assert sample(logits, [req], [mask]) == [30]  # 31 penalized by 2 below 30; min_tokens reached


def test_a_row_whose_masks_leave_nothing_reports_none_and_its_neighbour_samples() -> None:
    logits = torch.randn(2, VOCAB)
    reqs = [make_request("contradicted", temperature=0, min_tokens=3), make_request("free", temperature=0)]
    assert sample(logits, reqs, [bitmask({EOS}), None]) == [None, int(logits[1].argmax())]


def test_logprobs_stay_raw_under_a_grammar() -> None:
    logits = torch.randn(1, VOCAB) * 3
    req = make_request(temperature=0, logprobs=2)
    with torch.inference_mode():
        out = Sampler().sample(logits.clone(), build_batch([req], [bitmask({9})]))
    assert out.token_ids == [9] and out.logprobs is not None
    record = out.logprobs[0]
    assert record is not None
    assert record.logprob == pytest.approx(float(logits.log_softmax(-1)[0, 9]), abs=1e-6)
    assert record.rank == int((logits[0] > logits[0, 9]).sum()) + 1
    assert [t for t, _ in record.top] == logits[0].topk(2).indices.tolist()
