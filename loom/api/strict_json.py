"""Strict JSON bodies: what Python's `json` module accepts but a request must not carry.

Owns `loads_strict` and `StrictJSONRoute`, the route class that makes FastAPI parse bodies with
it. Refused (each a `json.JSONDecodeError`, which the error handlers answer with 400):
- duplicate keys in one object (parsers disagree on which wins: a request-smuggling vector);
- `NaN`, `Infinity`, and numbers that overflow to infinity (`1e999`);
- integers longer than `MAX_INT_DIGITS` digits (no field needs them; parsing them costs time);
- lone UTF-16 surrogates (`"\\ud800"`): no valid text contains them, and they break encoders;
- nesting deeper than `MAX_DEPTH`, and bytes that are not UTF-8.
Never checks field meanings: the wire models do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

MAX_INT_DIGITS = 40
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused(ValueError):
    pass


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key[:64]!r} in one object")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:32]} is out of range")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"integer of {len(text)} digits is out of range")
    return int(text)


def _check_strings(value: Any, depth: int = 0) -> None:
    if depth > MAX_DEPTH:
        raise _Refused(f"nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise _Refused("a string holds a lone UTF-16 surrogate, which is not valid text")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key, depth + 1)
            _check_strings(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item, depth + 1)


def loads_strict(raw: bytes | str) -> Any:
    """`json.loads` with the refusals above, each raised as `json.JSONDecodeError`."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float, parse_int=_int
        )
        _check_strings(value)
    except json.JSONDecodeError:
        raise
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("the body is not UTF-8", "", exc.start) from None
    except RecursionError:
        raise json.JSONDecodeError(f"nesting deeper than {MAX_DEPTH} levels", "", 0) from None
    except ValueError as exc:  # _Refused, and int() / float() refusals
        raise json.JSONDecodeError(str(exc), "", 0) from None
    return value


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_strict(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """An `APIRoute` whose JSON body is parsed by `loads_strict`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return strict_handler
