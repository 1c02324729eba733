"""`create_app(config, engine)`: the FastAPI application. No module-level app.

Owns routes and their path aliases, the request id header, SSE streaming with disconnect -> abort,
and readiness. Never samples or touches SQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from loom.api.convert import to_chat_request
from loom.api.errors import APIError, BadRequestError, UnprocessableEntityError, install_error_handlers, model_not_found
from loom.api.middleware import RequestIdMiddleware
from loom.api.protocol import ChatCompletionRequest, ignored_extra_fields
from loom.api.protocol_response import ModelCard, ModelList
from loom.api.render import ChunkOptions, ChunkWriter, completion_response
from loom.engine import AsyncEngine
from loom.serving.chat import ChatService
from loom.serving.prepare import PreparedChat
from loom.serving.types import InvalidRequest

T = TypeVar("T")
log = logging.getLogger(__name__)
CHAT_PATHS = ("/v1/chat/completions", "/v1/chat/completions/", "/api/v1/chat/completions")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    served_model_name: str
    model_path: str


def create_app(config: ServerConfig, engine: AsyncEngine) -> FastAPI:
    chat = ChatService(engine, config.served_model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="Loom", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    app.add_middleware(RequestIdMiddleware)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_running:
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> ModelList:
        card = ModelCard(id=config.served_model_name, root=config.model_path, max_model_len=engine.max_model_len)
        return ModelList(data=[card])

    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if body.model is not None and body.model != config.served_model_name:
            raise model_not_found(body.model)
        chat_req = to_chat_request(body, request.headers.get("x-request-id"))
        if extra := ignored_extra_fields(body):  # the spec allows unknown fields; say which went unused
            log.warning("request %s: fields no spec page defines were accepted and not used: %s", chat_req.request_id, extra)
        headers = {"x-request-id": chat_req.request_id}
        try:
            prepared = chat.prepare(chat_req)  # errors here still get a plain 4xx, not a broken stream
        except InvalidRequest as exc:
            raise _as_api_error(exc) from exc
        if body.stream:
            return _stream(chat, prepared, body, headers)
        result = await _unless_disconnected(request, chat.complete(prepared))
        if result is None:
            return Response(status_code=499)
        response = completion_response(result, config.served_model_name, chat_req.report)
        return JSONResponse(response.model_dump(), headers=headers)

    for path in CHAT_PATHS:
        app.post(path, include_in_schema=path == CHAT_PATHS[0])(chat_completions)
    return app


def _stream(
    chat: ChatService, prepared: PreparedChat, body: ChatCompletionRequest, headers: dict[str, str]
) -> Response:
    opts = body.stream_options
    chat_req = prepared.req
    writer = ChunkWriter(
        chat_req.request_id,
        chat.model_name,
        int(time.time()),
        ChunkOptions(
            include_usage=bool(opts and opts.include_usage),
            continuous_usage=bool(opts and opts.continuous_usage_stats),
            report=chat_req.report,
        ),
    )

    async def events() -> AsyncIterator[str]:
        deltas = chat.stream(prepared)
        try:
            async for line in writer.write(chat_req.n, deltas, prepared.prompt_ids):
                yield line
        finally:  # a client that left cancels this generator: close the engine streams now
            await deltas.aclose()  # type: ignore[attr-defined]

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Runs `work`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
    return task.result()


def _as_api_error(exc: InvalidRequest) -> APIError:
    error_class = UnprocessableEntityError if exc.status_code == 422 else BadRequestError
    return error_class(exc.message, param=exc.param)
