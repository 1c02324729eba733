"""`ChatCompletionRequest`: the body of `POST /v1/chat/completions`, as every spec page spells it.

`SamplingFields` holds what it shares with `/v1/completions` (`protocol_completions`).

Owns the request's wire shape (the union of the fields in `spec/` 000-004 plus the OpenAI SDK's
own, each with the spec's type and default), the range checks that make a bad value a 422 naming
its field, and the table of which fields the engine honors today (`unsupported_fields`). It never
converts to serving types (one converter does that) and never samples.

Where the spec pages disagree on a default, the "model decides" spelling wins: `temperature`,
`top_p`, `top_k`, `min_p` and `repetition_penalty` default to None (absent), never to a sentinel
such as -1; a client's explicit `top_k: -1` still means "off".

Message and tool shapes live in `protocol_messages`; response shapes in `protocol_response`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from loom.api.protocol_messages import (
    ChatMessageParam,
    NamedToolChoice,
    ToolParam,
    WireModel,
)
from loom.api.protocol_structured import AnyResponseFormat, StructuredOutputs

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1  # counts and token ids: what the engine's int tensors hold
_MAX_REPETITION_PENALTY = 1e4  # finite and far past any useful value
_MAX_LENGTH_PENALTY = 1e3
MAX_REQUEST_ID_CHARS = 256
MAX_LOGPROBS = 20  # top_logprobs and prompt_logprobs (OpenAI's and vLLM's default maximum)
LOGIT_BIAS_LIMIT = 100.0
# Keys of `vllm_xargs` some Loom extension reads. vLLM hands these to custom logits processors;
# Loom has none yet, so every key is answered 422 rather than accepted and dropped.
KNOWN_VLLM_XARGS: frozenset[str] = frozenset()

# ---- nested request objects ------------------------------------------------------------------


class StreamOptions(WireModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class RepetitionDetection(WireModel):
    """vLLM's `RepetitionDetectionParams`: `max_pattern_size` 0 turns it off; a `min_pattern_size`
    of 0 means 1."""

    max_pattern_size: int = Field(default=0, ge=0)
    min_pattern_size: int = Field(default=0, ge=0)
    min_count: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> RepetitionDetection:
        if self.max_pattern_size == 0:
            if self.min_pattern_size or self.min_count:
                raise ValueError("min_pattern_size and min_count need max_pattern_size > 0")
            return self
        if self.min_pattern_size > self.max_pattern_size:
            raise ValueError("min_pattern_size must be <= max_pattern_size")
        if self.min_count < 2:
            raise ValueError("min_count must be >= 2 (a pattern seen once is no repetition)")
        return self


# ---- the fields chat and completions share ----------------------------------------------------

XArgValue = str | int | float | list[str | int | float]
# printable ASCII: request_id becomes the `x-request-id` header and the response id
_PRINTABLE_ASCII = r"^[\x20-\x7e]+$"
_NO_CONTROL_CHARS = r"^[^\x00-\x1f\x7f]+$"


class SamplingFields(WireModel):
    """What `/v1/chat/completions` and `/v1/completions` share: length, stopping, sampling,
    penalties, token reports, streaming, structured outputs, scheduling and caching."""

    model: str | None = None  # None: the server's default model

    # -- length and stopping
    max_tokens: int | None = Field(default=None, ge=1, le=_INT32_MAX)
    min_tokens: int = Field(default=0, ge=0, le=_INT32_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False

    # -- sampling
    n: int | None = Field(default=1, ge=1)  # the upper bound is the server's (RequestLimits.max_n)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=_INT32_MAX)  # -1 and 0 mean off
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    frequency_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float | None = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=_MAX_REPETITION_PENALTY)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in -100..100
    allowed_token_ids: list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | None = None
    bad_words: list[str] | None = None
    best_of: int | None = Field(default=None, ge=1)  # as n: each candidate is a full generation
    use_beam_search: bool = False
    length_penalty: float = Field(default=1.0, ge=-_MAX_LENGTH_PENALTY, le=_MAX_LENGTH_PENALTY)
    repetition_detection: RepetitionDetection | None = None

    # -- log probabilities and token ids
    prompt_logprobs: int | None = Field(default=None, ge=-1)  # -1 (the whole vocabulary) is over the max
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None

    # -- streaming
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    # -- structured outputs: three spellings, all accepted (DESIGN.md "Names on the wire")
    response_format: AnyResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    # -- prompt rendering and detokenizing
    echo: bool = False
    add_special_tokens: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1, le=_INT32_MAX)  # -1: the model's length

    # -- scheduling and caching
    priority: int = Field(default=0, ge=_INT64_MIN, le=_INT64_MAX)
    request_id: str | None = Field(default=None, max_length=MAX_REQUEST_ID_CHARS, pattern=_PRINTABLE_ASCII)
    cache_salt: str | None = Field(default=None, min_length=1, pattern=_NO_CONTROL_CHARS)
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, XArgValue] | None = None
    user: str | None = None

    # Cross-field checks are field validators (declared after the fields they read) so a
    # failure names the offending field in `loc`, never the whole body.

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(not s for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty (an empty string would match everywhere)")
        return stop

    @field_validator("bad_words")
    @classmethod
    def _bad_words_not_blank(cls, words: list[str] | None) -> list[str] | None:
        if words is not None and any(not w.strip() for w in words):
            raise ValueError("bad_words must not be empty or blank")
        return words

    @field_validator("best_of")
    @classmethod
    def _best_of_covers_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n") or 1
        if best_of is not None and best_of < n:
            raise ValueError(f"best_of must be >= n (n={n})")
        return best_of

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_ids_and_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not _is_token_id(key):
                raise ValueError(f"logit_bias keys are token ids (non-negative integers), got {key[:32]!r}")
            if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
                raise ValueError(f"logit_bias values must be in -100..100, got {value} for token {key}")
        return bias

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed_ids_not_empty(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and not ids:
            raise ValueError("allowed_token_ids must not be empty (nothing could be sampled)")
        return ids

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_at_most_max(cls, k: int | None) -> int | None:
        if k is not None and (k < 0 or k > MAX_LOGPROBS):
            raise ValueError(f"prompt_logprobs must be in 0..{MAX_LOGPROBS} (-1, the whole vocabulary, is over it)")
        return k

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return options

    @field_validator("guided_choice")
    @classmethod
    def _choices_not_empty(cls, choices: list[str] | None) -> list[str] | None:
        if choices is not None and not choices:
            raise ValueError("guided_choice must list at least one choice")
        return choices

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _truncate_keeps_something(cls, k: int | None) -> int | None:
        if k == 0:
            raise ValueError("truncate_prompt_tokens must be -1 (the model's limit) or >= 1")
        return k

    @field_validator("vllm_xargs")
    @classmethod
    def _xargs_are_known(cls, xargs: dict[str, XArgValue] | None) -> dict[str, XArgValue] | None:
        unknown = sorted(set(xargs or {}) - KNOWN_VLLM_XARGS)
        if unknown:
            raise ValueError(f"no extension of this server reads vllm_xargs {unknown[:5]}")
        return xargs


# ---- the chat request ------------------------------------------------------------------------


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_INT32_MAX)

    # -- log probabilities (chat's shape: a flag and a count)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    # -- tools
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = "none"
    parallel_tool_calls: bool | None = True
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    # -- reasoning
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    include_reasoning: bool = True
    reasoning_content: bool | None = False  # spec 001: "enable reasoning content in response"
    thinking_token_budget: int | None = Field(default=None, ge=0, le=_INT32_MAX)  # vLLM's; else the effort's

    # -- prompt rendering
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None

    # -- OpenAI fields outside the spec pages, typed so that using one is visible
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    @field_validator("continue_final_message")
    @classmethod
    def _continue_excludes_generation_prompt(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("continue_final_message cannot be used with add_generation_prompt=true")
        return value


def _is_token_id(key: str) -> bool:
    return 0 < len(key) <= 10 and key.isascii() and key.isdigit()


# ---- helpers for the converter ---------------------------------------------------------------


def resolved_max_tokens(req: SamplingFields) -> int | None:
    """The completion budget the client asked for; chat's `max_completion_tokens` wins. None: no cap."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens


def resolved_tool_choice(
    req: ChatCompletionRequest,
) -> Literal["none", "auto", "required"] | NamedToolChoice:
    """OpenAI's rule: an unset `tool_choice` means "auto" when tools are given, else "none"."""
    if "tool_choice" not in req.model_fields_set or req.tool_choice is None:
        return "auto" if req.tools else "none"
    return req.tool_choice


# ---- what the engine honors today ------------------------------------------------------------

# Fields serving turns into engine behaviour. Move a field here when its feature lands.
HONORED_FIELDS: frozenset[str] = frozenset(
    {
        "model", "messages", "request_id", "user",
        "max_tokens", "max_completion_tokens", "min_tokens",
        "stop", "stop_token_ids", "ignore_eos", "include_stop_str_in_output",
        "n", "temperature", "top_p", "top_k", "min_p", "seed",
        "stream", "stream_options",
        "add_generation_prompt", "continue_final_message", "add_special_tokens",
        "chat_template", "chat_template_kwargs",
        "skip_special_tokens", "spaces_between_special_tokens",
        "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
        "allowed_token_ids", "bad_words",
        "logprobs", "top_logprobs", "prompt_logprobs", "return_tokens_as_token_ids", "return_token_ids",
        "echo", "best_of", "use_beam_search", "length_penalty",
        "truncate_prompt_tokens", "priority", "cache_salt", "repetition_detection",
        "kv_transfer_params", "vllm_xargs",
        "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call",
        "reasoning_effort", "include_reasoning", "reasoning_content", "documents", "thinking_token_budget",
        "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "guided_decoding_backend", "guided_whitespace_pattern",
    }
)  # fmt: skip

OffTest = Callable[[Any, ChatCompletionRequest], bool]


def _equals(*values: Any) -> OffTest:
    return lambda value, _req: value in values


def _always(_value: Any, _req: ChatCompletionRequest) -> bool:
    return True


# When an unhonored field counts as "not asked for". A field at its default, None, or empty is
# always off; this table spells out each feature's off values (some repeat the default, for the
# reader) and the harmless ones beyond it.
_OFF_WHEN: dict[str, OffTest] = {
    "tool_choice": _equals("none", "auto"),
    "function_call": _equals("none", "auto"),
    "response_format": lambda value, _req: value.type == "text",
    "include_reasoning": _equals(True),
    "reasoning_content": _equals(False),
    "modalities": _equals(["text"]),
    "store": _equals(False),  # we keep no completions, so only a request to store is unmet
    "service_tier": _equals("auto", "default"),
    # Only qualify features that are flagged on their own (tools, guided_*), or only describe
    # the caller: any value is harmless.
    "parallel_tool_calls": _always,
    "guided_decoding_backend": _always,
    "guided_whitespace_pattern": _always,
    "metadata": _always,
    "safety_identifier": _always,
    "prompt_cache_key": _always,
}


def _is_off(name: str, value: Any, req: ChatCompletionRequest) -> bool:
    if value is None or value == ChatCompletionRequest.model_fields[name].default:
        return True
    if isinstance(value, (list, dict, str)) and not value:
        return True
    off_when = _OFF_WHEN.get(name)
    return off_when is not None and off_when(value, req)


def unsupported_fields(req: ChatCompletionRequest) -> list[str]:
    """Names of fields the client set to a value the engine cannot honor yet, in field order.

    Extra (unknown) fields are not reported: the spec allows them, see `ignored_extra_fields`.
    """
    return [
        name
        for name in ChatCompletionRequest.model_fields
        if name in req.model_fields_set and name not in HONORED_FIELDS and not _is_off(name, getattr(req, name), req)
    ]


def ignored_extra_fields(req: ChatCompletionRequest) -> list[str]:
    """Names of fields no spec page defines; accepted (the spec allows them) and ignored."""
    return sorted(req.model_extra or {})
