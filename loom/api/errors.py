"""The OpenAI error envelope, and the handlers that make every failure answer with it.

Owns `{"error": {"message", "type", "param", "code"}}` for every non-2xx answer of the app:
`APIError` and its subclasses (raised by routes, or mapped from platform and serving errors by
the route layer), request validation (422 with the envelope plus FastAPI's `detail` list, or 400
when the body is not a JSON object at all), unknown routes and `HTTPException` (their status), and
anything unhandled (500, message only, no traceback). It never decides *whether* a request fails.

Status to `type`, after OpenAI's own answers: client errors are "invalid_request_error" (with a
more specific `code`), except 401 "authentication_error", 402 "insufficient_quota" and 429
"rate_limit_error"; server errors are "server_error".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_MAX_DESCRIBED_ERRORS = 3  # a 422 message names this many problems; `detail` has them all

# Validation error types that mean "the body is not a JSON object", not "a field is wrong".
_MALFORMED_BODY_TYPES = frozenset({"json_invalid", "model_attributes_type", "dict_type", "missing"})


class APIError(Exception):
    """An error the client should see, with its HTTP status and envelope fields."""

    status_code: int = 500
    type: str = "server_error"
    code: str | int | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status_code, headers=self.headers)


class BadRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class InsufficientBalanceError(APIError):
    status_code = 402
    type = "insufficient_quota"
    code = "insufficient_balance"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"


class UnprocessableEntityError(APIError):
    status_code = 422
    type = "invalid_request_error"


class RateLimitError(APIError):
    """429; pass `retry-after` and `x-ratelimit-*` as `headers`."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalServerError(APIError):
    status_code = 500
    type = "server_error"


class ServiceUnavailableError(APIError):
    """503: the server is overloaded (admission control) or not ready."""

    status_code = 503
    type = "server_error"
    code = "service_unavailable"


def model_not_found(model: str) -> NotFoundError:
    return NotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unsupported_parameters(names: Sequence[str]) -> UnprocessableEntityError:
    """The 422 for request fields the server accepts on the wire but cannot honor yet."""
    listed = ", ".join(f"'{name}'" for name in names)
    return UnprocessableEntityError(
        f"This server does not support these parameters yet: {listed}.",
        param=names[0] if names else None,
        code="unsupported_parameter",
    )


def error_envelope(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """The OpenAI error body; also what an SSE stream sends when it fails mid-way."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- handlers --------------------------------------------------------------------------------


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer of `app` an OpenAI envelope."""
    app.exception_handler(APIError)(_handle_api_error)
    app.exception_handler(RequestValidationError)(_handle_validation_error)
    app.exception_handler(StarletteHTTPException)(_handle_http_exception)
    # Starlette still re-raises after this handler answers, so the server logs the traceback.
    app.exception_handler(Exception)(_handle_unexpected)


async def _handle_api_error(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _handle_validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    malformed = next((err for err in errors if _is_malformed_body(err)), None)
    if malformed is not None:
        return BadRequestError(_malformed_body_message(malformed), code="invalid_json").response()
    error = UnprocessableEntityError(
        " ".join(_describe(err) for err in errors[:_MAX_DESCRIBED_ERRORS]),
        param=_field_name(errors[0]["loc"]) if errors else None,
    )
    # FastAPI's own `detail` list stays beside the envelope for clients written against it
    body = {**error.envelope(), "detail": [_detail_item(err) for err in errors]}
    return JSONResponse(body, status_code=error.status_code)


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"Invalid URL ({request.method} {request.url.path})"
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return JSONResponse(
        error_envelope(message, error_type),
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


async def _handle_unexpected(_request: Request, _exc: Exception) -> JSONResponse:
    return InternalServerError("The server had an error while processing your request.").response()


# ---- validation error wording ----------------------------------------------------------------


def _is_malformed_body(err: Mapping[str, Any]) -> bool:
    loc = tuple(err.get("loc", ()))
    if err.get("type") == "json_invalid":
        return True
    return loc == ("body",) and err.get("type") in _MALFORMED_BODY_TYPES


def _malformed_body_message(err: Mapping[str, Any]) -> str:
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "JSON decode error")
        return f"The request body is not valid JSON: {reason}."
    if err.get("type") == "missing":
        return "The request body is missing; send a JSON object."
    return "The request body must be a JSON object."


def _field_name(loc: Sequence[Any]) -> str | None:
    """The top-level field an error is about: loc is (source, field, ...), e.g. ("body", "n")."""
    return str(loc[1]) if len(loc) > 1 else None


def _path(loc: Sequence[Any]) -> str:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    path = ""
    for part in loc[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or str(loc[0] if loc else "body")


def _describe(err: Mapping[str, Any]) -> str:
    path = _path(err.get("loc", ()))
    if err.get("type") == "missing":
        return f"Missing required parameter: '{path}'."
    return f"Invalid value for '{path}': {err.get('msg', 'invalid value')}."


def _detail_item(err: Mapping[str, Any]) -> dict[str, Any]:
    # only the JSON-safe keys: `ctx` may hold the raised exception object itself
    return {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
