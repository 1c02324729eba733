"""`RequestLimits`: how much one request may ask of the server, and the check that enforces it.

Owns the sizes and counts a request may carry (each a `loom serve` flag, see `add_limit_flags`)
and `enforce_limits`, which answers a breach with a 422 naming the field. Types, ranges and
emptiness are the wire models' to check (`protocol`); the body size and read timeouts are the
middleware's (`middleware`). Memory a request can make the server hold is bounded by these.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def _limit(default: int | float, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_body_bytes: int = _limit(4 * 2**20, "largest request body; a larger one is 413, refused while reading")
    header_timeout_s: float = _limit(10.0, "seconds a connection may take to send a request's headers")
    body_timeout_s: float = _limit(30.0, "seconds a request may take to send its body (408 after)")
    max_messages: int = _limit(1024, "messages in one chat request")
    max_content_parts: int = _limit(256, "content parts in one message")
    max_stop: int = _limit(32, "stop strings in one request")
    max_stop_chars: int = _limit(256, "characters in one stop string or bad word")
    max_stop_token_ids: int = _limit(256, "stop_token_ids in one request")
    max_bad_words: int = _limit(256, "bad_words in one request")
    max_logit_bias: int = _limit(1024, "logit_bias entries in one request")
    max_allowed_token_ids: int = _limit(65536, "allowed_token_ids in one request")
    max_tools: int = _limit(128, "tools (or legacy functions) in one request")
    max_n: int = _limit(64, "n and best_of: sequences one request runs")
    max_cache_salt_chars: int = _limit(256, "characters in cache_salt")
    max_prompts: int = _limit(64, "prompts in one /v1/completions request (a list of strings or of token lists)")


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One `--max-...` / `--...-timeout-s` flag per limit, named after the field."""
    group = parser.add_argument_group("request limits")
    for f in dataclasses.fields(RequestLimits):
        group.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default, help=f.metadata["help"]
        )


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    return RequestLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RequestLimits)})


def _at_most(name: str, count: int, limit: int, what: str) -> None:
    if count > limit:
        # imported here: `loom serve --help` builds its flags from this module without the web stack
        from loom.api.errors import UnprocessableEntityError

        raise UnprocessableEntityError(
            f"'{name}' has {count} {what}; this server accepts at most {limit}", param=name, code="limit_exceeded"
        )


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def enforce_limits(req: Any, limits: RequestLimits) -> None:
    """422 naming the first field over its limit. `req` is a chat or completions wire request."""
    stop = _stop_list(req.stop)
    _at_most("stop", len(stop), limits.max_stop, "stop strings")
    _at_most("stop", max(map(len, stop), default=0), limits.max_stop_chars, "characters in a stop string")
    _at_most("stop_token_ids", len(req.stop_token_ids or ()), limits.max_stop_token_ids, "token ids")
    bad_words = req.bad_words or []
    _at_most("bad_words", len(bad_words), limits.max_bad_words, "words")
    _at_most("bad_words", max(map(len, bad_words), default=0), limits.max_stop_chars, "characters in a word")
    _at_most("logit_bias", len(req.logit_bias or {}), limits.max_logit_bias, "entries")
    _at_most("allowed_token_ids", len(req.allowed_token_ids or ()), limits.max_allowed_token_ids, "token ids")
    _at_most("n", req.n or 1, limits.max_n, "as n")
    _at_most("best_of", req.best_of or 1, limits.max_n, "as best_of")
    _at_most("cache_salt", len(req.cache_salt or ""), limits.max_cache_salt_chars, "characters")
    messages = getattr(req, "messages", None)
    if messages is not None:
        _at_most("messages", len(messages), limits.max_messages, "messages")
        parts = max((len(m.content) for m in messages if isinstance(getattr(m, "content", None), list)), default=0)
        _at_most("messages", parts, limits.max_content_parts, "content parts in one message")
        _at_most("tools", len(req.tools or ()), limits.max_tools, "tools")
        _at_most("functions", len(req.functions or ()), limits.max_tools, "functions")
