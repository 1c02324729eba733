"""Serving's own types: what the API converts a wire request into, and what serving hands back.

Frozen dataclasses only; the API layer owns the pydantic wire models and converts at its edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loom.engine import SamplingParams


class InvalidRequest(Exception):
    """A request the served model cannot honor; the API answers it with a 4xx envelope."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)  # name, tool_calls, ... passed to the template

    def as_template_dict(self) -> dict[str, Any]:
        return {**self.extra, "role": self.role, "content": self.content}


@dataclass(frozen=True, slots=True)
class TemplateOptions:
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams
    n: int = 1
    template: TemplateOptions = field(default_factory=TemplateOptions)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    index: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChatResult:
    request_id: str
    created: int
    choices: tuple[ChoiceResult, ...]
    usage: Usage
    prompt_token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """One streamed piece of one choice; `usage` is the running total when asked for per chunk."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage
