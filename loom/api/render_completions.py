"""Completions results -> wire answers: the `text_completion` body and the SSE chunks of a stream.

Owns the legacy logprobs object (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`, where
each offset is the token's character position in the choice's text, counting what earlier
chunks of a stream sent) and which optional parts appear (`ReportOptions`). Never decides values.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence

from loom.api.errors import error_envelope
from loom.api.protocol_completions import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
)
from loom.api.render import SYSTEM_FINGERPRINT, ChunkOptions, StreamProgress, wire_prompt_logprobs, wire_usage
from loom.engine import EngineError
from loom.serving import types as st
from loom.serving.completion import CompletionDelta, CompletionResult, TokenScore

log = logging.getLogger(__name__)


def wire_scores(scores: Sequence[TokenScore] | None, offset: int = 0) -> CompletionLogprobs | None:
    """`offset`: characters of the choice's text before the first of these tokens."""
    if scores is None:
        return None
    text_offset = []
    for score in scores:
        text_offset.append(offset)
        offset += len(score.token)
    return CompletionLogprobs(
        text_offset=text_offset,
        token_logprobs=[s.logprob for s in scores],
        tokens=[s.token for s in scores],
        top_logprobs=[None if s.top is None else dict(s.top) for s in scores],
    )


def completion_response(result: CompletionResult, model: str, report: st.ReportOptions) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=c.index,
            text=c.text,
            logprobs=wire_scores(c.logprobs),
            finish_reason=c.finish_reason or "stop",
            stop_reason=c.stop_reason,
            token_ids=list(c.token_ids) if report.token_ids else None,
            prompt_logprobs=wire_prompt_logprobs(result.prompt_logprobs[c.prompt_index]),
            prompt_token_ids=list(result.prompt_token_ids[c.prompt_index]) if report.token_ids else None,
        )
        for c in result.choices
    ]
    return CompletionResponse(
        id=result.request_id,
        created=result.created,
        model=model,
        choices=choices,
        usage=wire_usage(result.usage),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )


class CompletionChunkWriter:
    """Turns a stream of `CompletionDelta`s into SSE lines: one chunk per piece, then usage, [DONE].
    `progress` is the running state (usage so far, how it ended) for billing and metrics."""

    def __init__(self, request_id: str, model: str, created: int, options: ChunkOptions) -> None:
        self.request_id, self.model, self.created = request_id, model, created
        self.options = options
        self.progress = StreamProgress()
        self._sent_chars: dict[int, int] = {}  # per choice: characters of text sent so far

    def _sse(self, choices: list[CompletionStreamChoice], usage: st.Usage | None) -> str:
        chunk = CompletionStreamResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=wire_usage(usage) if usage is not None else None,
            system_fingerprint=SYSTEM_FINGERPRINT,
        )
        return f"data: {chunk.model_dump_json()}\n\n"

    def _choice(self, d: CompletionDelta) -> CompletionStreamChoice:
        offset = self._sent_chars.get(d.index, 0)
        self._sent_chars[d.index] = offset + len(d.text)
        return CompletionStreamChoice(
            index=d.index,
            text=d.text,
            logprobs=wire_scores(d.logprobs, offset),
            finish_reason=d.finish_reason,
            stop_reason=d.stop_reason,
            token_ids=list(d.token_ids) if self.options.report.token_ids else None,
            prompt_logprobs=wire_prompt_logprobs(d.prompt_logprobs),
            prompt_token_ids=None if d.prompt_token_ids is None else list(d.prompt_token_ids),
        )

    async def write(self, deltas: AsyncIterator[CompletionDelta], prompt_tokens: int) -> AsyncIterator[str]:
        opts = self.options
        progress = self.progress
        progress.usage = st.Usage(prompt_tokens, 0)
        try:
            async for d in deltas:
                progress.seen(d.usage, d.finish_reason)
                if not d.text and d.finish_reason is None and not d.token_ids and d.prompt_logprobs is None:
                    continue
                yield self._sse([self._choice(d)], d.usage if opts.continuous_usage else None)
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
