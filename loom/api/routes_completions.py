"""`POST /v1/completions` (also `/v1/completions/` and `/api/v1/completions`): vLLM's completions route.

Owns the route's edge flow, the same as chat's: the platform's requirements in the signature
(key, rate limits, load, hold; see `app`), model check, request limits (plus the number of prompts
and the sequences they run), the one converter to serving's `CompletionRequest`, serving's
refusals as 4xx, the hold once every prompt is counted, blocking or SSE streaming with disconnect
-> abort, settlement (`metering`), and `x-request-id`. Never samples.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from loom.api.common import as_api_error, check_model, server_failed
from loom.api.config import ServerConfig
from loom.api.convert import _check_beam_search_fields, _sampling_params
from loom.api.deps import AuthedKey, HoldMeter, LoadAdmission, RateLimits, check_model_allowed
from loom.api.errors import InternalServerError, UnprocessableEntityError, unsupported_parameters
from loom.api.limits import RequestLimits, enforce_limits
from loom.api.metering import MeteredRun, estimate
from loom.api.metrics import Metrics
from loom.api.protocol_completions import CompletionRequest as WireCompletionRequest
from loom.api.protocol_completions import prompts_of, unsupported_completion_fields
from loom.api.protocol_response import random_id
from loom.api.render import ChunkOptions
from loom.api.render_completions import CompletionChunkWriter, completion_response
from loom.api.strict_json import StrictJSONRoute
from loom.api.structured import structured_spec
from loom.engine import EngineError
from loom.platform import Estimate, RequestMeta
from loom.serving import completion
from loom.serving.chat import ChatService
from loom.serving.completion import CompletionRequest, PreparedCompletion
from loom.serving.types import ChatRequest, InvalidRequest, ReportOptions, SearchOptions, TemplateOptions

log = logging.getLogger(__name__)
COMPLETIONS_PATHS = ("/v1/completions", "/v1/completions/", "/api/v1/completions")


def completions_router(chat: ChatService, config: ServerConfig, metrics: Metrics) -> APIRouter:
    router = APIRouter(route_class=StrictJSONRoute)  # routes keep their class when included

    async def completions(
        body: WireCompletionRequest,
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
        req = to_completion_request(body, config.limits, request.headers.get("x-request-id"))
        if key is not None:  # the prefix cache is shared only within one account
            base = dataclasses.replace(req.base, cache_salt=key.cache_salt(req.base.cache_salt))
            req = dataclasses.replace(req, base=base)
        if extra := sorted(body.model_extra or {}):  # the spec allows unknown fields; say which went unused
            log.warning(
                "request %s: fields no spec page defines were accepted and not used: %s",
                req.base.request_id,
                extra[:20],
            )
        headers = {"x-request-id": req.base.request_id}
        try:  # tokenizing runs off the event loop; refusals are a plain 4xx, not a broken stream
            prepared = await completion.prepare(chat, req)
        except InvalidRequest as exc:
            raise as_api_error(exc) from exc
        await meter.admit(_estimate(prepared, chat.engine.max_model_len, config.model_name), _meta(req))
        run = MeteredRun(meter, timer)
        if body.stream:
            return _stream(chat, prepared, body, headers, run)
        try:
            result = await run.blocking(
                request,
                completion.complete(chat, prepared, run.produced),
                lambda r: (r.usage, r.choices[0].finish_reason if r.choices else None),
            )
        except EngineError as exc:  # logged by the engine; the client learns only that it failed
            raise InternalServerError(server_failed(req.base.request_id), headers=headers) from exc
        if result is None:
            return Response(status_code=499)
        response = completion_response(result, chat.model_name, req.base.report)
        return JSONResponse(response.model_dump(), headers=headers)

    for path in COMPLETIONS_PATHS:
        router.post(path, include_in_schema=path == COMPLETIONS_PATHS[0])(completions)
    return router


def to_completion_request(
    body: WireCompletionRequest, limits: RequestLimits, header_request_id: str | None = None
) -> CompletionRequest:
    """The one converter to serving. `request_id` comes from the body, else the header, else a fresh one."""
    unsupported = unsupported_completion_fields(body)
    if unsupported:
        raise unsupported_parameters(unsupported)
    prompts = prompts_of(body)
    _check_prompt_count(body, len(prompts), limits)
    echo_only = body.max_tokens == 0
    if echo_only and not body.echo:
        raise UnprocessableEntityError(
            "max_tokens 0 is only allowed with echo: true (score the prompt)", param="max_tokens"
        )
    if body.max_tokens is not None and body.min_tokens > body.max_tokens:
        raise UnprocessableEntityError(
            f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({body.max_tokens})", param="min_tokens"
        )
    if body.use_beam_search:
        _check_beam_search_fields(body)
    # echo_only still runs one token: the engine reports prompt logprobs with its first step
    sampling = _sampling_params(body.model_copy(update={"max_tokens": 1}) if echo_only else body)
    base = ChatRequest(
        request_id=body.request_id or header_request_id or random_id("cmpl"),
        messages=(),
        sampling=sampling,
        n=body.n or 1,
        template=TemplateOptions(add_special_tokens=body.add_special_tokens),
        report=ReportOptions(
            logprobs=body.logprobs is not None,
            top_logprobs=body.logprobs or 0,
            prompt_logprobs=body.prompt_logprobs,
            tokens_as_ids=bool(body.return_tokens_as_token_ids),
            token_ids=bool(body.return_token_ids),
        ),
        search=SearchOptions(
            best_of=body.best_of, beam_search=body.use_beam_search, length_penalty=body.length_penalty
        ),
        bad_words=tuple(body.bad_words or ()),
        truncate_prompt_tokens=body.truncate_prompt_tokens,
        priority=body.priority,
        cache_salt=body.cache_salt,
        user=body.user,
        structured=structured_spec(body),
    )
    return CompletionRequest(
        base, tuple(p if isinstance(p, str) else tuple(p) for p in prompts), echo=body.echo, echo_only=echo_only
    )


def _check_prompt_count(body: WireCompletionRequest, num_prompts: int, limits: RequestLimits) -> None:
    """Prompts are capped, and so are the sequences they run together (each prompt runs n or best_of)."""
    if num_prompts > limits.max_prompts:
        raise UnprocessableEntityError(
            f"'prompt' has {num_prompts} prompts; this server accepts at most {limits.max_prompts}",
            param="prompt",
            code="limit_exceeded",
        )
    per_prompt = max(body.n or 1, body.best_of or 1)
    if num_prompts * per_prompt > limits.max_n:
        name = "best_of" if (body.best_of or 1) > (body.n or 1) else "n"
        raise UnprocessableEntityError(
            f"{num_prompts} prompts x {name} {per_prompt} is {num_prompts * per_prompt} sequences; this server "
            f"runs at most {limits.max_n} for one request",
            param=name,
            code="limit_exceeded",
        )


def _estimate(prepared: PreparedCompletion, max_model_len: int, model: str) -> Estimate:
    """Every prompt's worst case; billed under the served model's first name."""
    first = prepared.prompts[0].chat
    lengths = [len(p.chat.prompt_ids) for p in prepared.prompts]
    return estimate(model, lengths, first.sampling.max_tokens, first.req.num_candidates, max_model_len)


def _meta(req: CompletionRequest) -> RequestMeta:
    return RequestMeta(req.base.request_id, req.base.user)


def _stream(
    chat: ChatService,
    prepared: PreparedCompletion,
    body: WireCompletionRequest,
    headers: dict[str, str],
    run: MeteredRun,
) -> Response:
    opts, base = body.stream_options, prepared.req.base
    writer = CompletionChunkWriter(
        base.request_id,
        chat.model_name,
        int(time.time()),
        ChunkOptions(
            include_usage=bool(opts and opts.include_usage),
            continuous_usage=bool(opts and opts.continuous_usage_stats),
            report=base.report,
        ),
    )
    prompt_tokens = sum(len(p.chat.prompt_ids) for p in prepared.prompts)

    async def events() -> AsyncGenerator[str, None]:
        deltas = completion.stream(chat, prepared, run.produced)
        try:
            async for line in writer.write(deltas, prompt_tokens):
                yield line
        finally:  # a client that left cancels this generator: close the engine streams now
            await deltas.aclose()  # type: ignore[attr-defined]

    lines = run.stream(events(), writer.progress)
    return StreamingResponse(lines, media_type="text/event-stream", headers=headers)
