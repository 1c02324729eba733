"""`POST /v1/completions` on the real `create_app` over a toy engine: prompt shapes, prompt-major
choice indexes, echo and the legacy logprobs (prompt tokens first, as lm-eval reads them),
streaming, and every refusal naming its field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from byte_tokenizer import byte_tokenizer
from fastapi.testclient import TestClient
from toy_engine import EOS, PIECES, ToyEngine, toy_logprobs

from loom.api.app import create_app
from loom.api.config import ServerConfig
from loom.api.limits import RequestLimits
from loom.engine import RequestOutput, SamplingParams
from loom.engine.logprobs import TokenLogprob

MODEL = "toy"
PATHS = ("/v1/completions", "/v1/completions/", "/api/v1/completions")


class ScoringToyEngine(ToyEngine):
    """The toy engine, plus what completions need of it: greedy tokens one output at a time up to
    `max_tokens`, logprobs with top k, and prompt logprobs on the first output."""

    async def generate(
        self, req_id: str, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        self.requests.append((req_id, tuple(prompt_ids), params))
        context = list(prompt_ids)
        prompt = None
        if params.prompt_logprobs is not None:
            prompt = (None, *(record(context[:p], context[p], params.prompt_logprobs) for p in range(1, len(context))))
        steps = params.max_tokens or 4
        for step in range(1, steps + 1):
            token_id = toy_logprobs(context)[0][0]
            rec = record(context, token_id, params.logprobs or 0)
            context.append(token_id)
            done = step == steps or token_id == EOS
            yield RequestOutput(
                req_id, (token_id,), self.tokenizer.decode([token_id], True), done,
                ("stop" if token_id == EOS else "length") if done else None, None, len(prompt_ids), step,
                (rec,) if params.logprobs is not None else None, prompt if step == 1 else None, 0,
            )  # fmt: skip
            if done:
                return


def record(context: Sequence[int], token_id: int, k: int) -> TokenLogprob:
    ranked = toy_logprobs(context)
    rank = next(i for i, (t, _) in enumerate(ranked, start=1) if t == token_id)
    return TokenLogprob(token_id, dict(ranked)[token_id], rank, tuple(ranked[:k]))


def scoring_client(tokenizer: Any = None, **limits: Any) -> TestClient:
    engine = ScoringToyEngine()
    if tokenizer is not None:
        engine.tokenizer = tokenizer
    config = ServerConfig(served_model_names=(MODEL,), limits=RequestLimits(**limits))
    app = create_app(config, engine)  # type: ignore[arg-type]
    app.state.engine = engine
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def api() -> Iterator[TestClient]:
    with scoring_client() as client:
        yield client


def post(api: TestClient, path: str = PATHS[0], **fields: Any) -> Any:
    return api.post(path, json={"model": MODEL, **fields})


def sent(api: TestClient) -> list[tuple[str, tuple[int, ...], SamplingParams]]:
    return api.app.state.engine.requests  # type: ignore[attr-defined,no-any-return]


def events(text: str) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_every_path_answers_a_text_completion_with_request_id(api: TestClient, path: str) -> None:
    resp = post(api, path, prompt="ab", max_tokens=2, request_id="my-id")
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "my-id"
    body = resp.json()
    assert (body["object"], body["id"], body["model"]) == ("text_completion", "my-id", MODEL)
    choice = body["choices"][0]
    assert choice["text"] and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4, "prompt_tokens_details": {"cached_tokens": 0}
    }  # fmt: skip


def test_max_tokens_defaults_to_16_and_text_prompts_get_special_tokens(api: TestClient) -> None:
    assert post(api, prompt="ab").status_code == 200
    assert sent(api)[0][2].max_tokens == 16


@pytest.mark.parametrize(
    ("prompt", "expected_ids"),
    [
        ("ab", [(0, 1)]),
        (["ab", "c"], [(0, 1), (2,)]),
        ([2, 0, 3], [(2, 0, 3)]),
        ([[2, 0], [1]], [(2, 0), (1,)]),
    ],
)
def test_each_prompt_is_its_own_sequence_and_choices_are_prompt_major(
    api: TestClient, prompt: Any, expected_ids: list[tuple[int, ...]]
) -> None:
    body = post(api, prompt=prompt, n=2, max_tokens=1, return_token_ids=True).json()
    n = 2
    assert [c["index"] for c in body["choices"]] == list(range(len(expected_ids) * n))
    for c in body["choices"]:
        assert tuple(c["prompt_token_ids"]) == expected_ids[c["index"] // n]
        assert c["token_ids"] == [toy_logprobs(c["prompt_token_ids"])[0][0]]
    assert sorted(p for _, p, _ in sent(api)) == sorted(ids for ids in expected_ids for _ in range(n))
    assert body["usage"]["prompt_tokens"] == sum(map(len, expected_ids))
    assert body["usage"]["completion_tokens"] == len(expected_ids) * n


def test_echo_prepends_the_prompt_text_as_sent_or_decoded(api: TestClient) -> None:
    texts = [c["text"] for c in post(api, prompt=["ab", "c."], echo=True, max_tokens=1).json()["choices"]]
    assert texts[0].startswith("ab") and len(texts[0]) == 3 and texts[1].startswith("c.")
    ids = post(api, prompt=[2, 3, 0], echo=True, max_tokens=1).json()["choices"][0]["text"]
    assert ids.startswith("c.a")


def test_echo_with_logprobs_puts_the_prompt_tokens_first_as_lm_eval_reads_them(api: TestClient) -> None:
    prompt = [0, 1, 2, 1]
    choice = post(api, prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0).json()["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"][:4] == ["a", "b", "c", "b"] and len(lp["tokens"]) == 5
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for p in range(1, 4):
        assert lp["token_logprobs"][p] == pytest.approx(dict(toy_logprobs(prompt[:p]))[prompt[p]])
        best_token, best_logprob = toy_logprobs(prompt[:p])[0]
        top = lp["top_logprobs"][p]
        assert top[PIECES[best_token]] == pytest.approx(best_logprob)
        assert 1 <= len(top) <= 2  # the top 1 and the token itself
    generated = toy_logprobs(prompt)[0]
    assert lp["token_logprobs"][4] == pytest.approx(generated[1])
    assert lp["text_offset"] == [0, 1, 2, 3, 4]
    assert choice["text"] == "abcb" + ("" if generated[0] == EOS else PIECES[generated[0]])


def test_logprobs_alone_cover_generated_tokens_with_up_to_k_plus_one_alternatives(api: TestClient) -> None:
    lp = post(api, prompt="ab", logprobs=3, max_tokens=2).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 2 and None not in lp["token_logprobs"]
    assert all(3 <= len(top) <= 4 for top in lp["top_logprobs"])
    assert sent(api)[0][2].logprobs == 3 and sent(api)[0][2].prompt_logprobs is None


def test_max_tokens_0_with_echo_scores_the_prompt_and_shows_nothing_generated(api: TestClient) -> None:
    choice = post(api, prompt="abc", echo=True, max_tokens=0, logprobs=0).json()["choices"][0]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == ["a", "b", "c"]
    assert [len(t) for t in choice["logprobs"]["top_logprobs"][1:]] == [1, 1]
    assert sent(api)[0][2].max_tokens == 1


def test_prompt_logprobs_come_per_choice_with_the_clients_k(api: TestClient) -> None:
    body = post(api, prompt=["ab", "ca"], prompt_logprobs=1, echo=True, logprobs=3, max_tokens=1).json()
    for choice in body["choices"]:
        entries = choice["prompt_logprobs"]
        assert entries[0] is None and len(entries) == 2
        assert 1 <= len(entries[1]) <= 2
    assert sent(api)[0][2].prompt_logprobs == 3  # what echo needed, trimmed to 1 for the client


def test_truncate_prompt_tokens_keeps_the_last_tokens(api: TestClient) -> None:
    body = post(api, prompt="abcab", truncate_prompt_tokens=2, echo=True, max_tokens=1).json()
    assert sent(api)[0][1] == (0, 1)
    assert body["choices"][0]["text"].startswith("ab") and body["usage"]["prompt_tokens"] == 2


# ---- streaming -------------------------------------------------------------------------------


def test_a_stream_carries_the_same_choices_as_the_blocking_answer(api: TestClient) -> None:
    fields = {"prompt": ["ab", "c"], "n": 2, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0}
    blocking = post(api, **fields).json()
    resp = post(api, **fields, stream=True, stream_options={"include_usage": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    chunks = events(resp.text)
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    offsets: dict[int, list[int]] = {}
    for chunk in chunks[:-1]:
        assert chunk["object"] == "text_completion" and len(chunk["choices"]) == 1
        c = chunk["choices"][0]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"])
        offsets.setdefault(c["index"], []).extend(c["logprobs"]["text_offset"])
    for choice in blocking["choices"]:
        assert texts[choice["index"]] == choice["text"]
        assert tokens[choice["index"]] == choice["logprobs"]["tokens"]
        assert offsets[choice["index"]] == choice["logprobs"]["text_offset"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == blocking["usage"]


def test_a_stream_with_echo_only_sends_each_prompt_once_per_choice(api: TestClient) -> None:
    resp = post(api, prompt=["ab", "ca"], echo=True, max_tokens=0, stream=True, return_token_ids=True)
    chunks = [c["choices"][0] for c in events(resp.text)]
    assert {c["index"]: c["text"] for c in chunks} == {0: "ab", 1: "ca"}
    assert all(c["finish_reason"] == "length" and c["token_ids"] == [] for c in chunks)
    assert {c["index"]: c["prompt_token_ids"] for c in chunks} == {0: [0, 1], 1: [2, 0]}


# ---- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, 7]}, "prompt"),  # outside the toy vocabulary of 5
        ({"prompt": [[1], [2, 9]]}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1, "min_tokens": 2}, "min_tokens"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
        ({"guided_regex": "a+", "use_beam_search": True}, "guided_regex"),
        ({"prompt_embeds": "AAAA"}, "prompt_embeds"),
        ({"logits_processors": ["my.Processor"]}, "logits_processors"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"use_beam_search": True, "logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": ["a"] * 65}, "prompt"),
        ({"prompt": ["a"] * 9, "n": 8}, "n"),
        ({"prompt": ["a"] * 2, "n": 2, "best_of": 40}, "best_of"),
        ({"stop": ["x"] * 33}, "stop"),
    ],
)
def test_refusals_are_422_naming_the_field(api: TestClient, fields: dict[str, Any], param: str) -> None:
    resp = post(api, **{"prompt": "ab", **fields})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["param"] == param
    assert resp.headers["x-request-id"]
    assert sent(api) == []


def test_a_missing_prompt_is_422(api: TestClient) -> None:
    resp = api.post(PATHS[0], json={"model": MODEL})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": "a" * 64}, "prompt"),  # 64 prompt tokens + 1 > the toy window of 64
        ({"prompt": "a" * 60, "max_tokens": 5}, "prompt"),
        ({"prompt": ["ab", ""]}, "prompt"),
        ({"prompt": "a" * 60, "max_tokens": None, "min_tokens": 5}, "min_tokens"),
    ],
)
def test_prompts_beyond_the_context_window_or_empty_are_400(
    api: TestClient, fields: dict[str, Any], param: str
) -> None:
    resp = post(api, **fields)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param
    assert sent(api) == []


def test_unknown_model_is_404_and_duplicate_keys_are_400(api: TestClient) -> None:
    assert post(api, prompt="ab", model="other").status_code == 404
    resp = api.post(
        PATHS[0],
        content=b'{"model": "toy", "prompt": "ab", "prompt": [1]}',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400


def test_the_prompt_cap_is_the_servers_flag() -> None:
    with scoring_client(max_prompts=2) as api:
        assert post(api, prompt=["a", "b"], max_tokens=1).status_code == 200
        resp = post(api, prompt=["a", "b", "c"], max_tokens=1)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "limit_exceeded"


def test_an_output_constraint_compiles_once_for_every_prompts_sequences() -> None:
    """Grammar backends need a real fast tokenizer: the byte-level one stands in for the model's."""
    with scoring_client(tokenizer=byte_tokenizer()) as api:
        resp = post(api, prompt=["ab", "ba"], n=2, max_tokens=2, response_format={"type": "json_object"})
        assert resp.status_code == 200, resp.text
        grammars = {id(params.grammar) for _, _, params in sent(api)}
        assert len(sent(api)) == 4 and len(grammars) == 1 and None not in {p.grammar for _, _, p in sent(api)}
