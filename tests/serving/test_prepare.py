"""`prepare`: truncation, the vocabulary and policy checks, bad words into token sequences, and
the per-candidate params (seeds, engine logprobs, prompt logprobs once)."""

from __future__ import annotations

import dataclasses

import pytest
from toy_engine import PIECES, ToyEngine, ToyTokenizer

from loom.serving.prepare import PreparedChat, bad_words_ids, prepare
from loom.serving.sampling import SamplingOptions
from loom.serving.types import ChatMessage, ChatRequest, InvalidRequest, ReportOptions, SearchOptions

USER = (ChatMessage("user", "abcabcabc"),)  # the toy template renders "<user>abcabcabc": 15 ids


def prepare_toy(req: ChatRequest, engine: ToyEngine) -> PreparedChat:
    """`prepare` of the text the toy template renders (the renderer has tests of its own)."""
    text = "".join(f"<{m.role}>{m.content}" for m in req.messages)
    return prepare(req, text, engine)  # type: ignore[arg-type]


def request(**fields: object) -> ChatRequest:
    return ChatRequest("r", fields.pop("messages", USER), fields.pop("sampling", SamplingOptions(max_tokens=4)), **fields)  # type: ignore[arg-type]


def test_truncate_prompt_tokens_keeps_the_last_k() -> None:
    full = prepare_toy(request(), ToyEngine())  # type: ignore[arg-type]
    cut = prepare_toy(request(truncate_prompt_tokens=5), ToyEngine())  # type: ignore[arg-type]
    assert cut.prompt_ids == full.prompt_ids[-5:]


def test_truncate_minus_one_leaves_room_for_the_completion() -> None:
    engine = ToyEngine(max_model_len=12)
    with pytest.raises(InvalidRequest):
        prepare_toy(request(), engine)  # type: ignore[arg-type]
    prepared = prepare_toy(request(truncate_prompt_tokens=-1), engine)  # type: ignore[arg-type]
    assert len(prepared.prompt_ids) == 12 - 4


def test_priority_needs_the_priority_policy() -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_toy(request(priority=1), ToyEngine())  # type: ignore[arg-type]
    assert (err.value.param, err.value.status_code) == ("priority", 422)
    prepare_toy(request(priority=1), ToyEngine(scheduling_policy="priority"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        (SamplingOptions(logit_bias=((5, 1.0),)), "logit_bias"),
        (SamplingOptions(allowed_token_ids=(0, 9)), "allowed_token_ids"),
    ],
)
def test_token_ids_outside_the_vocabulary_are_422(sampling: SamplingOptions, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        prepare_toy(request(sampling=sampling), ToyEngine())  # type: ignore[arg-type]
    assert (err.value.param, err.value.status_code) == (param, 422)


def test_bad_words_are_banned_alone_and_after_a_space() -> None:
    class Spaced(ToyTokenizer):
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [9 if ch == " " else PIECES.index(ch) for ch in text]

    assert bad_words_ids((" ab", "c"), Spaced()) == ((0, 1), (9, 0, 1), (2,), (9, 2))


def test_each_candidate_gets_its_own_seed_and_prompt_logprobs_come_once() -> None:
    req = request(
        sampling=SamplingOptions(max_tokens=4, seed=2**63 - 1), n=2, search=SearchOptions(best_of=3),
        report=ReportOptions(prompt_logprobs=2),
    )  # fmt: skip
    params = prepare_toy(req, ToyEngine()).candidate_params()  # type: ignore[arg-type]
    assert [p.seed for p in params] == [2**63 - 1, -(2**63), -(2**63) + 1]  # wraps within int64
    assert [p.prompt_logprobs for p in params] == [2, None, None]
    assert all(p.logprobs == 0 for p in params), "best_of ranks by logprob even if the client did not ask"


def test_logprobs_follow_the_client_and_n_alone_needs_none() -> None:
    plain = prepare_toy(request(n=2), ToyEngine())  # type: ignore[arg-type]
    assert plain.sampling.logprobs is None
    asked = prepare_toy(request(report=ReportOptions(logprobs=True, top_logprobs=3)), ToyEngine())  # type: ignore[arg-type]
    assert asked.sampling.logprobs == 3


def test_echo_only_repeats_an_assistant_message() -> None:
    prefill = (*USER, ChatMessage("assistant", "ab"))
    report = ReportOptions(echo=True)
    assert prepare_toy(dataclasses.replace(request(report=report), messages=prefill), ToyEngine()).echo == "ab"  # type: ignore[arg-type]
    assert prepare_toy(request(report=report), ToyEngine()).echo == ""  # type: ignore[arg-type]
