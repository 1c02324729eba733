"""Structured outputs through the real server on the default model: every field in its spellings,
blocking and streaming, beside free requests in one batch, and the bad inputs (a 422 before any
stream starts, the server healthy after each).

Whenever `finish_reason` is "stop", the text satisfies the constraint: checked with `jsonschema`,
`re.fullmatch` or the choice list. Schemas bound their strings and numbers so the small model
finishes within a few dozen tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion
from wire import complete, post, stream, streamed_choices, streamed_text

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK_JSON = "Describe a person named Ann who is 30 years old, as JSON."
ASK_CODE = "Invent a product code."
CODE = r"[A-Z]{3}-[0-9]{4}"
CHOICES = ["red", "green", "blue"]
ASK_COLOR = "What color is the sky?"


def content(resp: dict[str, Any], index: int = 0) -> str:
    return resp["choices"][index]["message"]["content"]


def assert_person(text: str) -> None:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    assert json.dumps(value, separators=(",", ":"), ensure_ascii=False) == text  # compact by default


@pytest.mark.parametrize(
    "fields",
    [
        {"guided_json": PERSON},
        {"guided_json": json.dumps(PERSON)},
        {"structured_outputs": {"json": PERSON}},
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            }
        },
    ],
    ids=["guided_json", "guided_json-string", "structured_outputs.json", "response_format.json_schema"],
)
def test_json_schema_in_every_spelling(base_url: str, fields: dict[str, Any]) -> None:
    resp = complete(base_url, ASK_JSON, max_tokens=40, temperature=0, **fields)
    assert resp["choices"][0]["finish_reason"] == "stop"
    assert_person(content(resp))


@pytest.mark.parametrize(
    ("fields", "check"),
    [
        ({"guided_regex": CODE}, lambda t: re.fullmatch(CODE, t)),
        ({"structured_outputs": {"regex": CODE}}, lambda t: re.fullmatch(CODE, t)),
        ({"guided_choice": CHOICES}, lambda t: t in CHOICES),
        ({"structured_outputs": {"choice": CHOICES}}, lambda t: t in CHOICES),
        ({"guided_grammar": 'start: "(" NUM "," NUM ")"\nNUM: /[0-9]{1,3}/'}, lambda t: re.fullmatch(r"\([0-9]{1,3},[0-9]{1,3}\)", t)),
        ({"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}}, lambda t: t in ("yes", "no")),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
        ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
    ],
    ids=["guided_regex", "so.regex", "guided_choice", "so.choice", "guided_grammar-lark", "so.grammar-gbnf", "rf.json_object", "so.json_object"],
)  # fmt: skip
def test_regex_choice_grammar_and_json_object(
    base_url: str, fields: dict[str, Any], check: Callable[[str], Any]
) -> None:
    prompt = ASK_COLOR if "choice" in json.dumps(fields) else ASK_CODE
    resp = complete(base_url, prompt, max_tokens=48, temperature=0, **fields)
    assert resp["choices"][0]["finish_reason"] == "stop", content(resp)
    assert check(content(resp)), content(resp)


def test_structural_tags_in_both_forms(base_url: str) -> None:
    """The current form as a bare tag (so the text is exactly one call); the legacy form is free text
    in which each trigger opens a call, so only the calls that appear are checked."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}
    current = {
        "type": "structural_tag",
        "format": {
            "type": "tag",
            "begin": "<call>",
            "content": {"type": "json_schema", "json_schema": schema},
            "end": "</call>",
        },
    }
    legacy = {
        "type": "structural_tag",
        "structures": [{"begin": "<call>", "schema": schema, "end": "</call>"}],
        "triggers": ["<call>"],
    }
    prompt = "Call the weather tool for Paris."
    resp = complete(base_url, prompt, max_tokens=32, temperature=0, response_format=current)
    call = re.fullmatch(r"<call>(.*)</call>", content(resp), re.S)
    assert resp["choices"][0]["finish_reason"] == "stop" and call, content(resp)
    jsonschema.validate(json.loads(call.group(1)), schema)
    resp = complete(
        base_url, prompt + " Write <call> then the JSON.", max_tokens=32, temperature=0, response_format=legacy
    )
    for match in re.finditer(r"<call>(.*?)</call>", content(resp), re.S):
        jsonschema.validate(json.loads(match.group(1)), schema)


def test_streaming_with_n_and_logprobs(base_url: str) -> None:
    chunks = stream(base_url, ASK_JSON, max_tokens=40, temperature=0.8, seed=3, n=2, logprobs=True, guided_json=PERSON)
    for index in (0, 1):
        choices = streamed_choices(chunks, index)
        assert choices[-1]["finish_reason"] == "stop"
        assert_person(streamed_text(chunks, index))
        records = [r for c in choices if c.get("logprobs") for r in c["logprobs"]["content"]]
        assert records and all(r["logprob"] <= 0 for r in records)


async def test_constrained_and_free_requests_share_batches(
    async_client: Callable[[], openai.AsyncOpenAI], greedy: Callable[..., ChatCompletion]
) -> None:
    free_prompts = [f"Name a fruit, then count to {i + 3}." for i in range(8)]
    solo = [greedy(p, 16).choices[0].message.content for p in free_prompts]
    async with async_client() as client:

        async def ask(prompt: str, **extra: Any) -> ChatCompletion:
            messages = [{"role": "user", "content": prompt}]
            return await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, **extra)  # type: ignore[arg-type]

        constrained = [
            ask(ASK_COLOR, max_tokens=16, temperature=0.7, seed=i, extra_body={"guided_choice": CHOICES}) if i % 2
            else ask(ASK_CODE, max_tokens=16, temperature=0.7, seed=i, extra_body={"guided_regex": CODE})
            for i in range(8)
        ]  # fmt: skip
        free = [ask(p, max_tokens=16, temperature=0) for p in free_prompts]
        results = await asyncio.gather(*constrained, *free)
    for i, resp in enumerate(results[:8]):
        text = resp.choices[0].message.content or ""
        assert resp.choices[0].finish_reason == "stop"
        assert text in CHOICES if i % 2 else re.fullmatch(CODE, text), text
    assert [r.choices[0].message.content for r in results[8:]] == solo


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"guided_json": PERSON, "guided_regex": CODE}, "guided_regex"),
        ({"guided_choice": CHOICES, "response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"guided_regex": "([a-z"}, "guided_regex"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "guided_json"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_regex": "(a+)+b"}, "guided_regex"),
        ({"guided_regex": "(.*a){30}"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": CODE, "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"guided_regex": CODE, "use_beam_search": True, "n": 2}, "guided_regex"),
    ],
    ids=["two-constraints", "choice-and-json-object", "json_schema-without-schema", "invalid-regex", "invalid-schema",
         "invalid-grammar", "nested-plus", "nested-dot-star", "empty-choice", "unknown-backend", "beam-search"],
)  # fmt: skip
def test_bad_constraints_are_422_before_any_stream_and_the_server_stays_healthy(
    base_url: str, fields: dict[str, Any], param: str
) -> None:
    for streaming in (False, True):
        start = time.perf_counter()
        resp = post(base_url, ASK_CODE, max_tokens=8, stream=streaming, **fields)
        assert resp.status_code in (400, 422), resp.text
        assert resp.json()["error"]["param"] == param, resp.text
        assert time.perf_counter() - start < 10
    if "guided_decoding_backend" in fields:
        assert "llguidance" in resp.json()["error"]["message"]
    assert httpx.get(f"{base_url}/health", timeout=10).status_code == 200
