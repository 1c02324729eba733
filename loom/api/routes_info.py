"""Routes that describe the server: `/health`, `/ping`, `/version` and the model list.

Owns the `/v1/models` family and its aliases (`/api/v1/models`, trailing slashes, and
`/v1/models/{id}` where an id may contain `/`). A model card's `root` is a model name, never a
filesystem path. Never touches a request's generation.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from loom.api.errors import model_not_found
from loom.api.protocol_response import ModelCard, ModelList
from loom.api.strict_json import StrictJSONRoute

VERSION = "0.1.0"
MODELS_PATHS = ("/v1/models", "/v1/models/", "/api/v1/models", "/api/v1/models/")


def info_router(names: tuple[str, ...], max_model_len: Callable[[], int], is_running: Callable[[], bool]) -> APIRouter:
    """`names`: the served model names, the first the primary (each a card whose root is it)."""
    router = APIRouter(route_class=StrictJSONRoute)

    def cards() -> list[ModelCard]:
        return [ModelCard(id=name, root=names[0], max_model_len=max_model_len()) for name in names]

    @router.get("/health")
    async def health() -> Response:
        if not is_running():
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ping() -> Response:
        return await health()

    router.add_api_route("/ping", ping, methods=["GET", "POST"])

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    async def models() -> ModelList:
        return ModelList(data=cards())

    for path in MODELS_PATHS:
        router.add_api_route(path, models, methods=["GET"], include_in_schema=path == MODELS_PATHS[0])

    async def model(model_id: str) -> ModelCard:
        for card in cards():
            if card.id == model_id:
                return card
        raise model_not_found(model_id)

    for prefix in ("/v1/models/", "/api/v1/models/"):
        router.add_api_route(
            prefix + "{model_id:path}", model, methods=["GET"], include_in_schema=prefix == "/v1/models/"
        )
    return router
