"""Chat templates: renders messages into the prompt text with a sandboxed Jinja environment."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loom.serving.types import ChatMessage, InvalidRequest, TemplateOptions


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def render_chat(
    messages: tuple[ChatMessage, ...],
    options: TemplateOptions,
    default_template: str | None,
    special_tokens: dict[str, str | None],
) -> str:
    source = options.chat_template or default_template
    if source is None:
        raise InvalidRequest("the served model has no chat template; pass one in `chat_template`", "chat_template")
    if options.continue_final_message and options.add_generation_prompt:
        raise InvalidRequest(
            "continue_final_message and add_generation_prompt cannot both be true", "continue_final_message"
        )
    if options.continue_final_message and messages[-1].role != "assistant":
        raise InvalidRequest("continue_final_message needs a final assistant message", "continue_final_message")
    try:
        text: str = _compile(source).render(
            messages=[m.as_template_dict() for m in messages],
            add_generation_prompt=options.add_generation_prompt,
            **special_tokens,
            **options.chat_template_kwargs,
        )
    except TemplateError as exc:
        raise InvalidRequest(f"chat template error: {exc}", "messages") from exc
    if options.continue_final_message:
        text = _cut_after_final_message(text, messages[-1].content or "")
    return text


def _cut_after_final_message(text: str, final_content: str) -> str:
    """Drops the end-of-turn markup after the last message so the model continues it."""
    cut = text.rfind(final_content.strip()) if final_content.strip() else -1
    if cut < 0:
        return text
    return text[: cut + len(final_content.strip())]
