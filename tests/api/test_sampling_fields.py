"""The sampling, logprob and scheduling fields at the HTTP edge: their 422s name the
field, and the converter carries every one of them into serving's types."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from loom.api.convert import to_chat_request
from loom.api.errors import UnprocessableEntityError
from loom.api.protocol import ChatCompletionRequest, unsupported_fields
from loom.serving.sampling import Repetition

USER = [{"role": "user", "content": "hi"}]


def parse(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-3": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [3, -1]}, "allowed_token_ids"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"vllm_xargs": {"unknown": 1}}, "vllm_xargs"),
        ({"repetition_detection": {"max_pattern_size": 2, "min_count": 1}}, "repetition_detection"),
        ({"repetition_detection": {"max_pattern_size": 2, "min_pattern_size": 3, "min_count": 2}}, "repetition_detection"),
        ({"repetition_detection": {"min_count": 3}}, "repetition_detection"),
        ({"priority": 2**63}, "priority"),
        ({"best_of": 1, "n": 2}, "best_of"),
    ],
)
def test_bad_values_name_their_field(fields: dict[str, Any], loc: str) -> None:
    with pytest.raises(ValidationError) as info:
        parse(**fields)
    assert {err["loc"][0] for err in info.value.errors()} == {loc}


def test_every_sampling_and_report_field_is_honored() -> None:
    req = parse(
        presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"5": -100},
        allowed_token_ids=[1, 2], bad_words=["x"], logprobs=True, top_logprobs=3, prompt_logprobs=2,
        return_tokens_as_token_ids=True, return_token_ids=True, echo=True, n=2, best_of=3,
        length_penalty=0.5, truncate_prompt_tokens=-1, priority=3, cache_salt="s",
        repetition_detection={"max_pattern_size": 4, "min_count": 3}, kv_transfer_params={"a": 1}, vllm_xargs={},
    )  # fmt: skip
    assert unsupported_fields(req) == []


def test_the_converter_carries_every_field() -> None:
    chat = to_chat_request(
        parse(
            presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, logit_bias={"5": -100, "07": 2},
            allowed_token_ids=[1, 2, 1], bad_words=["x"], logprobs=True, top_logprobs=3, prompt_logprobs=2,
            return_tokens_as_token_ids=True, return_token_ids=True, echo=True, n=2, best_of=3,
            length_penalty=0.5, truncate_prompt_tokens=7, priority=3, cache_salt="s", user="u",
            repetition_detection={"max_pattern_size": 4, "min_count": 3},
        )
    )  # fmt: skip
    s = chat.sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -1, 1.2)
    assert s.logit_bias == ((5, -100), (7, 2)) and s.allowed_token_ids == (1, 2)
    assert s.repetition_detection == Repetition(4, 1, 3)
    assert chat.bad_words == ("x",)
    r = chat.report
    assert (r.logprobs, r.top_logprobs, r.prompt_logprobs, r.tokens_as_ids, r.token_ids, r.echo) == (
        True, 3, 2, True, True, True,
    )  # fmt: skip
    assert (chat.search.best_of, chat.search.length_penalty, chat.num_candidates) == (3, 0.5, 3)
    assert (chat.truncate_prompt_tokens, chat.priority, chat.cache_salt, chat.user) == (7, 3, "s", "u")


def test_unset_fields_leave_the_engine_defaults() -> None:
    s = to_chat_request(parse(repetition_penalty=None, repetition_detection={"max_pattern_size": 0})).sampling
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.0, 0.0, 1.0)
    assert s.logit_bias == () and s.allowed_token_ids is None and s.repetition_detection is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"repetition_penalty": 1.3}, "repetition_penalty"),
        ({"logit_bias": {"3": 5}}, "logit_bias"),
        ({"allowed_token_ids": [3]}, "allowed_token_ids"),
        ({"bad_words": ["x"]}, "bad_words"),
        ({"repetition_detection": {"max_pattern_size": 2, "min_count": 2}}, "repetition_detection"),
    ],
)
def test_beam_search_refuses_what_reshapes_its_distribution(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UnprocessableEntityError) as err:
        to_chat_request(parse(use_beam_search=True, **fields))
    assert err.value.param == param


def test_beam_search_accepts_sampling_controls_it_has_no_use_for() -> None:
    chat = to_chat_request(parse(use_beam_search=True, n=2, temperature=0.7, top_p=0.9, seed=3, length_penalty=2))
    assert chat.search.beam_search and chat.num_candidates == 2
