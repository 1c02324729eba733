"""Chat templates: messages -> prompt text, rendered in a sandbox that runs off the event loop.

Owns the rules a request's template controls must follow (a template sent by the request needs
`trust_request_templates`; `chat_template_kwargs` may not set the renderer's own arguments and is
bounded in size), the render arguments every template sees, and `continue_final_message`. The
rendering itself happens in worker processes (`template_pool`, `template_worker`) with a time
budget, an output budget and a memory limit, so a template that loops, recurses or explodes is a
4xx for its own request and nothing else waits on it. Never tokenizes.

Limits (defaults; all per render):
  time_budget_s       2.0 s   from sending the request to the worker to reading its reply
  max_output_chars    4 MiB   characters of rendered prompt (and of any one value built inside)
  memory_limit_bytes  1 GiB   the worker's address space (RLIMIT_AS)
  MAX_KWARGS_BYTES    64 KiB  `chat_template_kwargs` as JSON (a trusted `chat_template` excluded)
  MAX_TEMPLATE_CHARS  128 KiB a template sent by the request
  template_worker.MAX_RANGE  10,000 items in one `range()`
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from loom.serving.template_pool import PoolLimits, RenderFailure, TemplatePool
from loom.serving.types import ChatMessage, InvalidRequest, TemplateOptions

MAX_KWARGS_BYTES = 64 * 1024
MAX_TEMPLATE_CHARS = 128 * 1024
# What the renderer passes itself (special tokens come on top); kwargs may not replace them.
RESERVED_KWARGS = frozenset(
    {
        "messages", "tools", "documents", "add_generation_prompt", "continue_final_message",
        "bos_token", "eos_token", "tokenize", "return_dict", "chat_template",
        # the sandbox's own globals: a template must find the real ones
        "raise_exception", "strftime_now", "range", "dict", "namespace", "cycler", "joiner",
    }
)  # fmt: skip


class TemplateRenderer:
    """Renders chat templates on a pool of worker processes; `close()` at shutdown stops them."""

    def __init__(
        self,
        *,
        trust_request_templates: bool = False,
        time_budget_s: float = 2.0,
        max_output_chars: int = 4 * 1024 * 1024,
        num_workers: int = 2,
        memory_limit_bytes: int = 1024**3,
    ) -> None:
        if num_workers < 1 or time_budget_s <= 0 or max_output_chars < 1:
            raise ValueError("num_workers, time_budget_s and max_output_chars must be positive")
        self.trust_request_templates = trust_request_templates
        self._pool = TemplatePool(PoolLimits(num_workers, time_budget_s, max_output_chars, memory_limit_bytes))

    def start(self) -> None:
        """Boots the workers now instead of on the first render; returns at once."""
        self._pool.start()

    def close(self) -> None:
        self._pool.close()

    @property
    def worker_pids(self) -> frozenset[int]:
        return self._pool.pids

    async def render(
        self,
        messages: tuple[ChatMessage, ...],
        options: TemplateOptions,
        default_template: str | None,
        special_tokens: Mapping[str, str | None],
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text, or `InvalidRequest` (400 / 422 naming the field) for any failure."""
        source, context, from_request = render_arguments(
            messages, options, default_template, special_tokens, self.trust_request_templates, tools, documents
        )
        try:
            text = await self._pool.render(source, context)
        except RenderFailure as exc:
            raise _as_invalid(exc, from_request) from exc
        return finish_render(text, messages, options)

    def render_sync(
        self,
        messages: tuple[ChatMessage, ...],
        options: TemplateOptions,
        default_template: str | None,
        special_tokens: Mapping[str, str | None],
        *,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
    ) -> str:
        """`render` for a caller already off the event loop (a worker thread): blocks until done."""
        source, context, from_request = render_arguments(
            messages, options, default_template, special_tokens, self.trust_request_templates, tools, documents
        )
        try:
            text = self._pool.render_blocking(source, context)
        except RenderFailure as exc:
            raise _as_invalid(exc, from_request) from exc
        return finish_render(text, messages, options)


def _as_invalid(exc: RenderFailure, from_request: bool) -> InvalidRequest:
    if exc.server_fault:  # the pool is closed or cannot start a worker: not the request's fault
        return InvalidRequest(exc.message, None, status_code=503)
    return InvalidRequest(exc.message, "chat_template" if from_request else "messages")


def render_arguments(
    messages: tuple[ChatMessage, ...],
    options: TemplateOptions,
    default_template: str | None,
    special_tokens: Mapping[str, str | None],
    trust_request_templates: bool,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any], bool]:
    """The checked template source, its JSON-ready context, and whether the request sent it."""
    source, from_request = _template_source(options, default_template, trust_request_templates)
    kwargs = _checked_kwargs(options.chat_template_kwargs, special_tokens)
    _check_continue(messages, options)
    context = {
        **kwargs,
        **special_tokens,
        "messages": [_plain(m.as_template_dict()) for m in messages],
        "add_generation_prompt": options.add_generation_prompt,
    }
    if tools is not None:
        context["tools"] = _plain(tools)
    if documents is not None:
        context["documents"] = _plain(documents)
    return source, context, from_request


def finish_render(text: str, messages: tuple[ChatMessage, ...], options: TemplateOptions) -> str:
    if options.continue_final_message:
        return _cut_after_final_message(text, messages[-1].content or "")
    return text


def _template_source(
    options: TemplateOptions, default_template: str | None, trust_request_templates: bool
) -> tuple[str, bool]:
    """The template to render and whether the request sent it."""
    sent = [t for t in (options.chat_template, options.chat_template_kwargs.get("chat_template")) if t is not None]
    if not sent:
        if default_template is None:
            raise InvalidRequest("the served model has no chat template", "chat_template")
        return default_template, False
    if not trust_request_templates:
        raise InvalidRequest(
            "this server does not render chat templates sent in requests "
            "(start it with --trust-request-chat-template to allow them)",
            "chat_template",
        )
    if len(sent) == 2 and sent[0] != sent[1]:
        raise InvalidRequest(
            "chat_template and chat_template_kwargs.chat_template differ; send one", "chat_template", 422
        )
    source = sent[0]
    if not isinstance(source, str) or len(source) > MAX_TEMPLATE_CHARS:
        raise InvalidRequest(
            f"chat_template must be a string of at most {MAX_TEMPLATE_CHARS} characters", "chat_template", 422
        )
    return source, True


def _checked_kwargs(kwargs: Mapping[str, Any], special_tokens: Mapping[str, str | None]) -> dict[str, Any]:
    """`chat_template_kwargs` without the template (checked apart), refused if it sets our own arguments."""
    extra = {key: value for key, value in kwargs.items() if key != "chat_template"}
    for key in extra:
        if not isinstance(key, str) or key in RESERVED_KWARGS or key in special_tokens:
            raise InvalidRequest(
                f"chat_template_kwargs may not set '{key}': the server passes it to the template itself",
                "chat_template_kwargs",
                422,
            )
    try:
        size = len(json.dumps(extra, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("chat_template_kwargs must be plain JSON values", "chat_template_kwargs", 422) from exc
    if size > MAX_KWARGS_BYTES:
        raise InvalidRequest(
            f"chat_template_kwargs is {size} bytes as JSON, over the limit of {MAX_KWARGS_BYTES}",
            "chat_template_kwargs",
            422,
        )
    return extra


def _check_continue(messages: tuple[ChatMessage, ...], options: TemplateOptions) -> None:
    if not options.continue_final_message:
        return
    if options.add_generation_prompt:
        raise InvalidRequest(
            "continue_final_message and add_generation_prompt cannot both be true", "continue_final_message"
        )
    if not messages or messages[-1].role != "assistant":
        raise InvalidRequest("continue_final_message needs a final assistant message", "continue_final_message")


def _plain(value: Any) -> Any:
    """JSON-ready copies of the message mappings (they may be read-only `Mapping`s or tuples)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _cut_after_final_message(text: str, final_content: str) -> str:
    """Drops the end-of-turn markup after the last message so the model continues it."""
    cut = text.rfind(final_content.strip()) if final_content.strip() else -1
    if cut < 0:
        return text
    return text[: cut + len(final_content.strip())]
