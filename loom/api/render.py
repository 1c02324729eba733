"""Serving results -> wire responses: the blocking body and the SSE chunks of a stream.

What the client asked to see (`ReportOptions`) decides which optional parts appear: logprobs,
token ids, prompt logprobs. `kv_transfer_params` is always null: Loom has no disaggregated
prefill, so there is nothing to hand to a decode instance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from loom.api.errors import error_envelope
from loom.api.protocol_response import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCallOut,
    PromptLogprob,
    PromptTokensDetails,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
)
from loom.engine import EngineError
from loom.serving import types as st

SYSTEM_FINGERPRINT = "loom-0.1.0"
log = logging.getLogger(__name__)


def wire_usage(usage: st.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def wire_logprobs(entries: tuple[st.LogprobEntry, ...] | None) -> ChoiceLogprobs | None:
    if entries is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.bytes),
                top_logprobs=[TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in e.top],
            )
            for e in entries
        ]
    )


def wire_prompt_logprobs(entries: st.PromptLogprobs | None) -> list[dict[str, PromptLogprob] | None] | None:
    """The spec's shape: per prompt token (the first None), token id -> {logprob, rank, decoded_token}."""
    if entries is None:
        return None
    return [
        None
        if position is None
        else {
            str(p.token_id): PromptLogprob(logprob=p.logprob, rank=p.rank, decoded_token=p.decoded_token)
            for p in position
        }
        for position in entries
    ]


def wire_message(choice: st.ChoiceResult, legacy_functions: bool) -> ChatMessage:
    """Content (None when the turn is only tool calls), reasoning under both names, the calls."""
    calls = [ToolCall(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in choice.tool_calls]
    content = choice.text if choice.text or not calls else None
    if legacy_functions:  # answered as the legacy `functions` were asked: one `function_call`
        function_call = calls[0].function if calls else None
        return ChatMessage(
            content=content, reasoning_content=choice.reasoning, reasoning=choice.reasoning, function_call=function_call
        )
    return ChatMessage(
        content=content, reasoning_content=choice.reasoning, reasoning=choice.reasoning, tool_calls=calls
    )


def wire_delta(delta: st.ChoiceDelta) -> DeltaMessage:
    calls = [
        DeltaToolCall(
            index=c.index, id=c.id, type="function" if c.id is not None else None,
            function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
        )
        for c in delta.tool_calls
    ]  # fmt: skip
    reasoning = delta.reasoning or None
    return DeltaMessage(
        content=delta.text or None, reasoning_content=reasoning, reasoning=reasoning, tool_calls=calls or None
    )


def _finish_reason(reason: str | None, legacy_functions: bool) -> str:
    if legacy_functions and reason == "tool_calls":
        return "function_call"
    return reason or "stop"


def completion_response(
    result: st.ChatResult, model: str, report: st.ReportOptions, legacy_functions: bool = False
) -> ChatCompletionResponse:
    choices = [
        ChatCompletionChoice(
            index=c.index,
            message=wire_message(c, legacy_functions),
            logprobs=wire_logprobs(c.logprobs),
            finish_reason=_finish_reason(c.finish_reason, legacy_functions),
            stop_reason=c.stop_reason,
            token_ids=list(c.token_ids) if report.token_ids else None,
        )
        for c in result.choices
    ]
    return ChatCompletionResponse(
        id=result.request_id,
        created=result.created,
        model=model,
        choices=choices,
        usage=wire_usage(result.usage),
        system_fingerprint=SYSTEM_FINGERPRINT,
        prompt_logprobs=wire_prompt_logprobs(result.prompt_logprobs),
        prompt_token_ids=list(result.prompt_token_ids) if report.token_ids else None,
    )


@dataclass(slots=True)
class StreamProgress:
    """A stream writer's running state: the usage its last delta reported (what the final usage
    chunk shows), whether every delta was written (`complete`) or the stream failed in-band."""

    usage: st.Usage = st.Usage(0, 0)
    finish_reason: str | None = None  # the last one a choice reported
    complete: bool = False
    failed: bool = False

    def seen(self, usage: st.Usage, finish_reason: str | None) -> None:
        self.usage = usage
        self.finish_reason = finish_reason or self.finish_reason


@dataclass(frozen=True, slots=True)
class ChunkOptions:
    include_usage: bool
    continuous_usage: bool
    report: st.ReportOptions
    legacy_functions: bool = False  # finish_reason "function_call" for the legacy `functions`


class ChunkWriter:
    """Turns a stream of `ChoiceDelta`s into SSE lines: role first, content deltas, finish, usage, [DONE].

    With `return_token_ids` the first chunk carries the prompt's ids and every content chunk its
    tokens' ids; `prompt_logprobs` ride on the chunk that carries choice 0's first tokens.
    `progress` is the running state (usage so far, how it ended) for billing and metrics.
    """

    def __init__(self, request_id: str, model: str, created: int, options: ChunkOptions) -> None:
        self.request_id, self.model, self.created = request_id, model, created
        self.options = options
        self.progress = StreamProgress()

    def _sse(self, choices: list[ChatCompletionStreamChoice], usage: st.Usage | None, **extra: Any) -> str:
        chunk = ChatCompletionStreamResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=wire_usage(usage) if usage is not None else None,
            system_fingerprint=SYSTEM_FINGERPRINT,
            **extra,
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    async def write(
        self, n: int, deltas: AsyncIterator[st.ChoiceDelta], prompt_token_ids: tuple[int, ...]
    ) -> AsyncIterator[str]:
        opts = self.options
        prompt_tokens = len(prompt_token_ids)
        start_usage = st.Usage(prompt_tokens, 0) if opts.continuous_usage else None
        for index in range(n):
            role = ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            first = index == 0 and opts.report.token_ids
            yield self._sse([role], start_usage, prompt_token_ids=list(prompt_token_ids) if first else None)
        progress = self.progress
        progress.usage = st.Usage(prompt_tokens, 0)
        try:
            async for d in deltas:
                progress.seen(d.usage, d.finish_reason)
                if not (d.text or d.reasoning or d.tool_calls or d.token_ids) and d.finish_reason is None:
                    continue
                choice = ChatCompletionStreamChoice(
                    index=d.index,
                    delta=wire_delta(d),
                    logprobs=wire_logprobs(d.logprobs),
                    finish_reason=d.finish_reason
                    if d.finish_reason is None
                    else _finish_reason(d.finish_reason, opts.legacy_functions),
                    stop_reason=d.stop_reason,
                    token_ids=list(d.token_ids) if opts.report.token_ids else None,
                )
                usage = d.usage if opts.continuous_usage else None
                yield self._sse([choice], usage, prompt_logprobs=wire_prompt_logprobs(d.prompt_logprobs))
        except Exception as exc:  # the stream has started: the failure can only be told in-band
            if not isinstance(exc, EngineError):  # an engine failure is logged where it happened
                log.exception("request %s: stream failed", self.request_id)
            progress.failed = True
            message = f"The server had an error while processing request {self.request_id}."
            yield f"data: {json.dumps(error_envelope(message, 'server_error'))}\n\n"
        progress.complete = not progress.failed
        if opts.include_usage:
            yield self._sse([], progress.usage)
        yield "data: [DONE]\n\n"
