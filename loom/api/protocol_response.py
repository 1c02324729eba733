"""Wire models of what Loom answers: chat completions, stream chunks, logprobs, usage, models.

Owns the response shapes of `spec/` 001 and 003 in a form the official `openai` SDK parses
(`ChatCompletion`, `ChatCompletionChunk`, `Model`). Reasoning is emitted under both
`reasoning_content` and `reasoning` (DESIGN.md "Names on the wire"). It never decides values:
serving fills these in.

Response models forbid unknown fields: we build them, so an unknown name is our typo.
Per vLLM, a stream chunk carries generated `token_ids` on the choice, not inside `delta`.
`prompt_logprobs` on a stream chunk is Loom's own (vLLM refuses prompt_logprobs when streaming).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


def random_id(prefix: str) -> str:
    """An id in OpenAI's style, e.g. `chatcmpl-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _now() -> int:
    return int(time.time())


# ---- log probabilities -----------------------------------------------------------------------


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(ResponseModel):
    content: list[TokenLogprob] | None = None


class PromptLogprob(ResponseModel):
    """One candidate at one prompt position (vLLM's `prompt_logprobs` entries)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# ---- usage -----------------------------------------------------------------------------------


class PromptTokensDetails(ResponseModel):
    cached_tokens: int | None = None


class Usage(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


# ---- non-streamed completion -----------------------------------------------------------------


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: FunctionCallOut | None = None


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = "stop"  # stop, length, tool_calls, abort...
    stop_reason: int | str | None = None  # the stop string or token id that ended the choice
    token_ids: list[int] | None = None  # with `return_token_ids`


class ChatCompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None
    kv_transfer_params: dict[str, Any] | None = None


# ---- stream chunks ---------------------------------------------------------------------------


class DeltaFunctionCall(ResponseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(ResponseModel):
    index: int  # which tool call of the choice this fragment extends
    id: str | None = None  # only on a call's first fragment
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None  # only on a choice's first chunk
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    refusal: str | None = None


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # this chunk's new token ids, with `return_token_ids`


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None  # the final chunk, or every chunk with continuous_usage_stats
    system_fingerprint: str | None = None
    service_tier: str | None = None
    prompt_token_ids: list[int] | None = None  # first chunk only, with `return_token_ids`
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None  # once, with choice 0's first tokens


# ---- GET /v1/models --------------------------------------------------------------------------


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "loom"
    root: str | None = None  # what the served name points at: a path or hub id
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
