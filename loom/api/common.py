"""Checks and error mappings every generating route shares."""

from __future__ import annotations

from loom.api.config import ServerConfig
from loom.api.errors import (
    APIError,
    BadRequestError,
    ServiceUnavailableError,
    UnprocessableEntityError,
    model_not_found,
)
from loom.serving.types import InvalidRequest


def server_failed(request_id: str) -> str:
    return f"The server had an error while processing request {request_id}."


def check_model(model: str | None, config: ServerConfig) -> None:
    if model is not None and model not in config.served_model_names:
        raise model_not_found(model)


_ERRORS_BY_STATUS: dict[int, type[APIError]] = {422: UnprocessableEntityError, 503: ServiceUnavailableError}


def as_api_error(exc: InvalidRequest) -> APIError:
    """Serving's refusal as the envelope of its status (400 unless serving said otherwise)."""
    return _ERRORS_BY_STATUS.get(exc.status_code, BadRequestError)(exc.message, param=exc.param)
