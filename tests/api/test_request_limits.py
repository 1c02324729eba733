"""Each size limit of `RequestLimits`: one over it is a 422 naming the field; at it is served."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import chat_body
from fastapi.testclient import TestClient

from loom.api.limits import RequestLimits

LIMITS = RequestLimits()
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": ["a"] * (LIMITS.max_stop + 1)}, "stop"),
        ({"stop": "a" * (LIMITS.max_stop_chars + 1)}, "stop"),
        ({"stop_token_ids": [1] * (LIMITS.max_stop_token_ids + 1)}, "stop_token_ids"),
        ({"bad_words": ["a"] * (LIMITS.max_bad_words + 1)}, "bad_words"),
        ({"bad_words": ["a" * (LIMITS.max_stop_chars + 1)]}, "bad_words"),
        ({"logit_bias": {str(i): 1 for i in range(LIMITS.max_logit_bias + 1)}}, "logit_bias"),
        ({"allowed_token_ids": [1] * (LIMITS.max_allowed_token_ids + 1)}, "allowed_token_ids"),
        ({"n": LIMITS.max_n + 1}, "n"),
        ({"best_of": LIMITS.max_n + 1}, "best_of"),
        ({"cache_salt": "s" * (LIMITS.max_cache_salt_chars + 1)}, "cache_salt"),
        ({"tools": [TOOL] * (LIMITS.max_tools + 1)}, "tools"),
        ({"messages": [{"role": "user", "content": "a"}] * (LIMITS.max_messages + 1)}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * (LIMITS.max_content_parts + 1)}]},
            "messages",
        ),
    ],
)
def test_one_over_a_limit_is_a_422_naming_the_field(api: TestClient, fields: dict[str, Any], param: str) -> None:
    resp = api.post("/v1/chat/completions", json=chat_body(**fields))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["code"] == "limit_exceeded"
    assert resp.headers["x-request-id"]


def test_limits_come_from_the_server_config(make_api: Any) -> None:
    with make_api(limits=RequestLimits(max_n=2, max_stop=1)) as api:
        assert api.post("/v1/chat/completions", json=chat_body(n=2, stop="x", max_tokens=1)).status_code == 200
        assert api.post("/v1/chat/completions", json=chat_body(n=3, max_tokens=1)).status_code == 422
        assert api.post("/v1/chat/completions", json=chat_body(stop=["x", "y"], max_tokens=1)).status_code == 422


def test_every_limit_is_a_serve_flag() -> None:
    import argparse

    from loom.cli import _serve_parser  # noqa: PLC0415

    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--max-n", "8", "--body-timeout-s", "2.5"])
    from loom.api.limits import limits_from_args

    limits = limits_from_args(args)
    assert limits.max_n == 8 and limits.body_timeout_s == 2.5
    assert limits.max_stop == LIMITS.max_stop
