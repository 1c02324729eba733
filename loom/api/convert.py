"""The one converter from the wire's `ChatCompletionRequest` to serving's `ChatRequest`.

Checks that need no tokenizer or engine end here (a 422 naming the field); the vocabulary,
context window and scheduling policy are serving's to check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loom.api.convert_tools import to_tool_options
from loom.api.errors import UnprocessableEntityError, unsupported_parameters
from loom.api.protocol import ChatCompletionRequest, SamplingFields, resolved_max_tokens, unsupported_fields
from loom.api.protocol_response import random_id
from loom.api.structured import structured_spec
from loom.serving.sampling import Repetition, SamplingOptions
from loom.serving.types import (
    ChatMessage,
    ChatRequest,
    ReasoningOptions,
    ReportOptions,
    SearchOptions,
    TemplateOptions,
)

_TEXT_PART_TYPES = frozenset({"text"})
_SKIPPED_PART_TYPES = frozenset({"thinking", "refusal"})  # earlier turns' side channels, not prompt text


def to_chat_request(req: ChatCompletionRequest, header_request_id: str | None = None) -> ChatRequest:
    """`request_id` comes from the body, else the `x-request-id` header, else a fresh one."""
    unsupported = unsupported_fields(req)
    if unsupported:
        raise unsupported_parameters(unsupported)
    if req.use_beam_search:
        _check_beam_search_fields(req)
    max_tokens = resolved_max_tokens(req)
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise UnprocessableEntityError(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    tools = to_tool_options(req)
    if req.use_beam_search and tools is not None and tools.forced:
        raise UnprocessableEntityError(
            "use_beam_search does not combine with a forced tool call: a constraint cannot follow every beam",
            param="tool_choice",
            code="unsupported_combination",
        )
    return ChatRequest(
        request_id=req.request_id or header_request_id or random_id("chatcmpl"),
        messages=chat_messages(req.messages),
        sampling=_sampling_params(req),
        n=req.n or 1,
        template=template_options(
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            add_special_tokens=req.add_special_tokens,
            chat_template=req.chat_template,
            chat_template_kwargs=req.chat_template_kwargs,
        ),
        report=ReportOptions(
            logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0,
            prompt_logprobs=req.prompt_logprobs,
            tokens_as_ids=bool(req.return_tokens_as_token_ids),
            token_ids=bool(req.return_token_ids),
            echo=req.echo,
        ),
        search=SearchOptions(best_of=req.best_of, beam_search=req.use_beam_search, length_penalty=req.length_penalty),
        bad_words=tuple(req.bad_words or ()),
        truncate_prompt_tokens=req.truncate_prompt_tokens,
        priority=req.priority,
        cache_salt=req.cache_salt,
        user=req.user,
        structured=structured_spec(req),
        tools=tools,
        reasoning=ReasoningOptions(
            include=_include_reasoning(req), effort=req.reasoning_effort, budget=req.thinking_token_budget
        ),
        documents=tuple(req.documents or ()),
    )


def _include_reasoning(req: ChatCompletionRequest) -> bool:
    """`include_reasoning` (default true); spec 001's `reasoning_content: false`, when sent, hides it too."""
    if "reasoning_content" in req.model_fields_set and req.reasoning_content is False:
        return False
    return req.include_reasoning


def _check_beam_search_fields(req: SamplingFields) -> None:
    """Fields that reshape the distribution a beam search ranks by are a 422 with it: penalties
    over generated tokens cannot follow a search that resubmits each beam as a prompt, and none
    of these is pretended. (Sampling controls, temperature to seed, have nothing to act on in a
    search that does not sample; README says so.)"""
    sampling = _sampling_params(req)
    in_use = {
        "presence_penalty": sampling.presence_penalty != 0,
        "frequency_penalty": sampling.frequency_penalty != 0,
        "repetition_penalty": sampling.repetition_penalty != 1,
        "logit_bias": bool(sampling.logit_bias),
        "allowed_token_ids": sampling.allowed_token_ids is not None,
        "bad_words": bool(req.bad_words),
        "repetition_detection": sampling.repetition_detection is not None,
    }
    for name, used in in_use.items():
        if used:
            raise UnprocessableEntityError(
                f"use_beam_search does not combine with '{name}': beam search ranks beams by the model's "
                "own log-probabilities",
                param=name,
                code="unsupported_combination",
            )


def _sampling_params(req: SamplingFields) -> SamplingOptions:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else None  # 0 and -1 mean off
    return SamplingOptions(
        max_tokens=resolved_max_tokens(req),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        min_tokens=req.min_tokens or 0,
        stop=tuple(stop),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=bool(req.ignore_eos),
        include_stop_str_in_output=bool(req.include_stop_str_in_output),
        skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=tuple({int(key): value for key, value in (req.logit_bias or {}).items()}.items()),
        allowed_token_ids=None if req.allowed_token_ids is None else tuple(dict.fromkeys(req.allowed_token_ids)),
        repetition_detection=_repetition_detection(req),
    )


def _repetition_detection(req: SamplingFields) -> Repetition | None:
    spec = req.repetition_detection
    if spec is None or spec.max_pattern_size == 0:
        return None
    return Repetition(spec.max_pattern_size, spec.min_pattern_size or 1, spec.min_count)


def chat_messages(messages: Sequence[Any]) -> tuple[ChatMessage, ...]:
    return tuple(_message(i, m) for i, m in enumerate(messages))


def template_options(
    *,
    add_generation_prompt: bool,
    continue_final_message: bool,
    add_special_tokens: bool,
    chat_template: str | None,
    chat_template_kwargs: dict[str, Any] | None,
) -> TemplateOptions:
    return TemplateOptions(
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        add_special_tokens=add_special_tokens,
        chat_template=chat_template,
        chat_template_kwargs=dict(chat_template_kwargs or {}),
    )


def _message(index: int, message: Any) -> ChatMessage:
    extra = message.model_dump(exclude={"role", "content"}, exclude_none=True)
    return ChatMessage(message.role, _text_content(index, getattr(message, "content", None)), extra)


def _text_content(index: int, content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = "text" if isinstance(part, str) else part.type
        if kind in _SKIPPED_PART_TYPES:
            continue
        if kind not in _TEXT_PART_TYPES:
            raise UnprocessableEntityError(
                f"messages[{index}] has a '{kind}' content part, but the served model reads text only",
                param="messages",
                code="unsupported_content",
            )
        texts.append(part if isinstance(part, str) else part.text)
    return "\n".join(texts)
