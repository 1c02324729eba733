"""Serving results -> wire responses: the blocking body and the SSE chunks of a stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from loom.api.errors import error_envelope
from loom.api.protocol_response import (
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    PromptTokensDetails,
    Usage,
)
from loom.engine import EngineError
from loom.serving import types as st

SYSTEM_FINGERPRINT = "loom-0.1.0"


def wire_usage(usage: st.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def completion_response(result: st.ChatResult, model: str) -> ChatCompletionResponse:
    choices = [
        ChatCompletionChoice(
            index=c.index,
            message=ChatMessage(role="assistant", content=c.text),
            finish_reason=c.finish_reason or "stop",
            stop_reason=c.stop_reason,
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
    )


class ChunkWriter:
    """Turns a stream of `ChoiceDelta`s into SSE lines: role first, content deltas, finish, usage, [DONE]."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool, continuous_usage: bool) -> None:
        self.request_id, self.model, self.created = request_id, model, created
        self.include_usage, self.continuous_usage = include_usage, continuous_usage

    def _sse(self, choices: list[ChatCompletionStreamChoice], usage: st.Usage | None) -> str:
        chunk = ChatCompletionStreamResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=wire_usage(usage) if usage is not None else None,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    async def write(self, n: int, deltas: AsyncIterator[st.ChoiceDelta], prompt_tokens: int) -> AsyncIterator[str]:
        start_usage = st.Usage(prompt_tokens, 0) if self.continuous_usage else None
        for index in range(n):
            role = ChatCompletionStreamChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
            yield self._sse([role], start_usage)
        last_usage = st.Usage(prompt_tokens, 0)
        try:
            async for d in deltas:
                last_usage = d.usage
                if not d.text and d.finish_reason is None:
                    continue
                choice = ChatCompletionStreamChoice(
                    index=d.index,
                    delta=DeltaMessage(content=d.text) if d.text else DeltaMessage(),
                    finish_reason=d.finish_reason,
                    stop_reason=d.stop_reason,
                )
                yield self._sse([choice], d.usage if self.continuous_usage else None)
        except EngineError as exc:
            yield f"data: {json.dumps(error_envelope(str(exc), 'server_error'))}\n\n"
        if self.include_usage:
            yield self._sse([], last_usage)
        yield "data: [DONE]\n\n"
