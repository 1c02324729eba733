"""`create_app(config, engine, platform)`: the FastAPI application. No module-level app.

Owns routes and their path aliases, the request id header, the edge limits (body size and read
time, request sizes, CORS), SSE streaming with disconnect -> abort, and readiness. Bodies are
parsed strictly (`strict_json`). A generating route reads as its requirements: the caller's key
(401), its requests per minute (429), the engine's queue (503), then, once the prompt is counted,
the hold on its balance (429 on tokens per minute, 402); the request settles when it ends
(`metering`). With `platform` None nothing is required, limited or billed. Never samples or
touches SQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse

from loom.api.common import as_api_error, check_model, server_failed
from loom.api.config import ServerConfig
from loom.api.convert import to_chat_request
from loom.api.deps import AuthedKey, HoldMeter, LoadAdmission, RateLimits, check_model_allowed, install_platform
from loom.api.errors import InternalServerError, install_error_handlers
from loom.api.limits import enforce_limits
from loom.api.metering import MeteredRun, estimate
from loom.api.metrics import Metrics, install_metrics
from loom.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from loom.api.protocol import ChatCompletionRequest, ignored_extra_fields
from loom.api.render import ChunkOptions, ChunkWriter, completion_response
from loom.api.routes_completions import completions_router
from loom.api.routes_info import info_router
from loom.api.routes_tokens import tokens_router
from loom.api.routes_usage import usage_router
from loom.api.strict_json import StrictJSONRoute
from loom.engine import AsyncEngine, EngineError
from loom.parsers import DEFAULT_TOOL_PARSER, reasoning_parser_for_model, tool_parser_for_model
from loom.platform import Estimate, Platform, RequestMeta
from loom.serving.chat import ChatService
from loom.serving.chat_prompt import ParserConfig
from loom.serving.prepare import PreparedChat
from loom.serving.structured import StructuredOutputCompiler
from loom.serving.templates import TemplateRenderer
from loom.serving.types import ChatRequest, InvalidRequest

log = logging.getLogger(__name__)
CHAT_PATHS = ("/v1/chat/completions", "/v1/chat/completions/", "/api/v1/chat/completions")


def warm_structured_outputs(engine: AsyncEngine, config: ServerConfig) -> StructuredOutputCompiler:
    """The grammar compiler for `create_app`, its default backend built now: on a thread that can
    wait (`loom serve`'s main thread, while the model loads on the engine's)."""
    structured = StructuredOutputCompiler(engine.tokenizer, default_backend=config.structured_outputs_backend)
    try:
        structured.warm_up()
    except Exception:  # an unusable backend: the requests that ask for it say why
        log.exception("building the structured-output backend %r failed", config.structured_outputs_backend)
    return structured


def create_app(
    config: ServerConfig,
    engine: AsyncEngine,
    platform: Platform | None = None,
    structured: StructuredOutputCompiler | None = None,
) -> FastAPI:
    """`structured`: the grammar compiler, when the caller built it already (`warm_structured_outputs`)."""
    renderer = TemplateRenderer(trust_request_templates=config.trust_request_chat_template)
    chat = ChatService(
        engine, config.model_name, renderer, parser_config(config), config.structured_outputs_backend, structured
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        renderer.start()
        # ~0.6 s, mostly Python holding the GIL: a server that takes requests meanwhile serves them
        # slowly (a first request's TTFT 1.0 s against 0.2 s), so `loom serve` builds it before
        # start-up ends (`warm_structured_outputs`) and this finds it built
        warm = asyncio.create_task(asyncio.to_thread(chat.structured.warm_up))
        yield
        await asyncio.gather(warm, return_exceptions=True)
        chat.structured.close()
        renderer.close()
        engine.shutdown()

    app = FastAPI(title="Loom", version="0.1.0", lifespan=lifespan)
    app.router.route_class = StrictJSONRoute
    install_error_handlers(app)
    # platform None: no auth, billing or limits (tests, embedding, benchmarks)
    install_platform(app, platform, lambda: engine.stats().num_waiting)
    metrics = Metrics(config.model_name, engine.stats)
    install_metrics(app, metrics)
    app.include_router(usage_router())
    # Starlette runs the last added outermost: request id (and the catch-all 500) around everything
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.cors.allowed_origins),
        allow_methods=list(config.cors.allowed_methods),
        allow_headers=list(config.cors.allowed_headers),
    )
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes, timeout_s=config.limits.body_timeout_s
    )
    app.add_middleware(RequestIdMiddleware)
    app.include_router(info_router(config.served_model_names, lambda: engine.max_model_len, lambda: engine.is_running))
    app.include_router(tokens_router(chat, config))
    app.include_router(completions_router(chat, config, metrics))

    async def chat_completions(
        body: ChatCompletionRequest,
        request: Request,
        key: AuthedKey,
        _rate: RateLimits,
        _load: LoadAdmission,
        meter: HoldMeter,
    ) -> Response:
        timer = metrics.timer()  # latencies count from arrival, as vLLM's do
        check_model(body.model, config)
        check_model_allowed(key, body.model or config.model_name, aliases=config.served_model_names)
        enforce_limits(body, config.limits)
        try:
            chat_req = to_chat_request(body, request.headers.get("x-request-id"))
        except InvalidRequest as exc:
            raise as_api_error(exc) from exc
        if extra := ignored_extra_fields(body):  # the spec allows unknown fields; say which went unused
            log.warning(
                "request %s: fields no spec page defines were accepted and not used: %s",
                chat_req.request_id,
                extra[:20],
            )
        if key is not None:  # the prefix cache is shared only within one account
            chat_req = dataclasses.replace(chat_req, cache_salt=key.cache_salt(chat_req.cache_salt))
        headers = {"x-request-id": chat_req.request_id}
        try:
            prepared = await chat.prepare(chat_req)  # errors here still get a plain 4xx, not a broken stream
        except InvalidRequest as exc:
            raise as_api_error(exc) from exc
        await meter.admit(_estimate(prepared, engine.max_model_len, config.model_name), _meta(chat_req))
        run = MeteredRun(meter, timer)
        if body.stream:
            return _stream(chat, prepared, body, headers, run)
        try:
            result = await run.blocking(
                request, chat.complete(prepared, run.produced), lambda r: (r.usage, r.choices[0].finish_reason)
            )
        except EngineError as exc:  # logged by the engine; the client learns only that it failed
            raise InternalServerError(server_failed(chat_req.request_id), headers=headers) from exc
        if result is None:
            return Response(status_code=499)
        legacy = chat_req.tools is not None and chat_req.tools.legacy_functions
        response = completion_response(result, config.model_name, chat_req.report, legacy)
        return JSONResponse(response.model_dump(), headers=headers)

    for path in CHAT_PATHS:
        app.post(path, include_in_schema=path == CHAT_PATHS[0])(chat_completions)
    return app


def parser_config(config: ServerConfig) -> ParserConfig:
    """The server's flags, else the parsers of the model's family."""
    family = " ".join(config.served_model_names)
    tool = config.tool_call_parser or tool_parser_for_model(family) or DEFAULT_TOOL_PARSER
    return ParserConfig(tool, config.reasoning_parser or reasoning_parser_for_model(family))


def _estimate(prepared: PreparedChat, max_model_len: int, model: str) -> Estimate:
    """Billed under the served model's first name, whichever alias the client used."""
    req = prepared.req
    return estimate(model, [len(prepared.prompt_ids)], prepared.sampling.max_tokens, req.num_candidates, max_model_len)


def _meta(req: ChatRequest) -> RequestMeta:
    return RequestMeta(req.request_id, req.user)


def _stream(
    chat: ChatService, prepared: PreparedChat, body: ChatCompletionRequest, headers: dict[str, str], run: MeteredRun
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
            legacy_functions=chat_req.tools is not None and chat_req.tools.legacy_functions,
        ),
    )

    async def events() -> AsyncGenerator[str, None]:
        deltas = chat.stream(prepared, run.produced)
        try:
            async for line in writer.write(chat_req.n, deltas, prepared.prompt_ids):
                yield line
        finally:  # a client that left cancels this generator: close the engine streams now
            await deltas.aclose()  # type: ignore[attr-defined]

    lines = run.stream(events(), writer.progress)
    return StreamingResponse(lines, media_type="text/event-stream", headers=headers)
