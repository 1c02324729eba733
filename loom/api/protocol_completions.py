"""`CompletionRequest` and its answers: the wire shapes of `POST /v1/completions` (vLLM's, OpenAI's legacy).

Owns the request (`SamplingFields` plus `prompt`, `suffix`, the legacy `logprobs` count, and
completions' own defaults: `max_tokens` 16, `add_special_tokens` true), the response and stream
chunk models (`text_completion`, the legacy logprobs object), and the table of fields the server
honors for completions (`unsupported_completion_fields`). Never converts to serving types
(`routes_completions` does) and never samples.

`prompt` is a string, a list of strings, a list of token ids or a list of token-id lists; the
server's limits (`RequestLimits.max_prompts`, the context window) are checked later. `max_tokens: 0`
is accepted here and allowed only with `echo` (score the prompt, generate nothing).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from loom.api.protocol import MAX_LOGPROBS, SamplingFields
from loom.api.protocol_response import PromptLogprob, ResponseModel, Usage, random_id

_INT32_MAX = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=_INT32_MAX)]


def _prompt_kind(value: Any) -> str | None:
    """Picks the one union member to validate against from the first element, so a large list of
    token ids is never also tried (and failed element by element) as a list of strings."""
    if isinstance(value, str):
        return "text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "id_lists"
    return "ids" if isinstance(first, int) and not isinstance(first, bool) else "texts"


Prompt = Annotated[
    Annotated[str, Tag("text")]
    | Annotated[list[str], Tag("texts")]
    | Annotated[list[TokenId], Tag("ids")]
    | Annotated[list[list[TokenId]], Tag("id_lists")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="prompt must be a string, a list of strings, a list of token ids or a list of token-id lists",
    ),
]


class CompletionRequest(SamplingFields):
    prompt: Prompt
    suffix: str | None = None  # fill-in-the-middle: the served model has none, so any value is a 422
    max_tokens: int | None = Field(default=16, ge=0, le=_INT32_MAX)  # OpenAI's default; 0 only with echo
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the sampled token's plus the top k
    add_special_tokens: bool = True  # a raw prompt gets the tokenizer's BOS, as vLLM's

    # -- vLLM fields Loom has no implementation of: typed so that using one is a 422, not dropped
    prompt_embeds: str | list[str] | None = None
    logits_processors: list[Any] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, prompt: str | list[Any]) -> str | list[Any]:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be an empty list, nor hold an empty list of token ids")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported: the served model has no fill-in-the-middle")
        return suffix


def prompts_of(req: CompletionRequest) -> list[str] | list[list[int]]:
    """The request's prompts, one entry each: texts or token-id lists."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


# ---- what the server honors for completions --------------------------------------------------

# Fields serving turns into engine behaviour on this route; the rest (prompt_embeds,
# logits_processors) are a 422 when set to anything but their default.
HONORED_COMPLETION_FIELDS: frozenset[str] = frozenset(
    {
        "model", "prompt", "suffix", "request_id", "user",
        "max_tokens", "min_tokens", "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
        "n", "temperature", "top_p", "top_k", "min_p", "seed",
        "stream", "stream_options", "echo", "add_special_tokens",
        "skip_special_tokens", "spaces_between_special_tokens",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
        "allowed_token_ids", "bad_words",
        "logprobs", "prompt_logprobs", "return_tokens_as_token_ids", "return_token_ids",
        "best_of", "use_beam_search", "length_penalty",
        "truncate_prompt_tokens", "priority", "cache_salt", "repetition_detection",
        "kv_transfer_params", "vllm_xargs",
        "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern",
    }
)  # fmt: skip


def _is_off(name: str, value: Any) -> bool:
    if value is None or value == CompletionRequest.model_fields[name].default:
        return True
    return isinstance(value, (list, dict, str)) and not value


def unsupported_completion_fields(req: CompletionRequest) -> list[str]:
    """Fields the client set to a value this route cannot honor, in field order."""
    return [
        name
        for name in CompletionRequest.model_fields
        if name in req.model_fields_set
        and name not in HONORED_COMPLETION_FIELDS
        and not _is_off(name, getattr(req, name))
    ]


# ---- answers ---------------------------------------------------------------------------------


class CompletionLogprobs(ResponseModel):
    """The legacy shape: parallel lists, one entry per token; `top_logprobs` maps token text to
    logprob (the k most likely and the token itself). A prompt's first token, which nothing
    predicts, has `null` logprob and top."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


WirePromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = "stop"
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # with `return_token_ids`
    prompt_logprobs: WirePromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # with `return_token_ids`: this choice's prompt


class CompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    service_tier: str | None = None
    kv_transfer_params: dict[str, Any] | None = None


class CompletionStreamChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # this chunk's new ids, with `return_token_ids`
    prompt_logprobs: WirePromptLogprobs | None = None  # once per prompt, on its first choice's first chunk
    prompt_token_ids: list[int] | None = None  # each choice's first chunk, with `return_token_ids`


class CompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None  # the final chunk, or every chunk with continuous_usage_stats
    system_fingerprint: str | None = None
