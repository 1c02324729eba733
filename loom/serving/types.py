"""Serving's own types: what the API converts a wire request into, and what serving hands back.

Frozen dataclasses only; the API layer owns the pydantic wire models and converts at its edge.
Log probabilities leave serving already formatted (token text, bytes), never as engine records.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loom.serving.sampling import SamplingOptions

if TYPE_CHECKING:
    from loom.serving.structured import StructuredOutputSpec
    from loom.serving.tools import ToolOptions


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
        # content None (an assistant turn that only called tools) renders as empty text, not "None"
        return {**self.extra, "role": self.role, "content": "" if self.content is None else self.content}


@dataclass(frozen=True, slots=True)
class TemplateOptions:
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReportOptions:
    """What the answer reports beyond the text."""

    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # None = off; k = the prompt token's logprob plus the top k
    tokens_as_ids: bool = False  # tokens rendered "token_id:N" (return_tokens_as_token_ids)
    token_ids: bool = False  # choices' token_ids and the prompt's (return_token_ids)
    echo: bool = False  # prepend the last message when it is the assistant's


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How the `n` answers are chosen: independent samples, the best of more, or a beam search."""

    best_of: int | None = None  # None = n
    beam_search: bool = False
    length_penalty: float = 1.0  # beam score = cumulative logprob / (length ** length_penalty)


@dataclass(frozen=True, slots=True)
class ReasoningOptions:
    include: bool = True  # reasoning_content / reasoning appear in the answer
    effort: str | None = None  # reasoning_effort, for templates that read it
    budget: int | None = None  # thinking_token_budget as sent (None: the effort's, see `thinking`)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    request_id: str
    messages: tuple[ChatMessage, ...]
    sampling: SamplingOptions  # serving turns it into the engine's params (`sampling.engine_params`)
    n: int = 1
    template: TemplateOptions = field(default_factory=TemplateOptions)
    report: ReportOptions = field(default_factory=ReportOptions)
    search: SearchOptions = field(default_factory=SearchOptions)
    bad_words: tuple[str, ...] = ()
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens; -1 = the model's limit
    priority: int = 0  # lower is served first (engine policy "priority" only)
    cache_salt: str | None = None
    user: str | None = None  # the end user, for the usage ledger
    tools: ToolOptions | None = None  # None: no tool in play (none given, or tool_choice "none")
    reasoning: ReasoningOptions = field(default_factory=ReasoningOptions)
    documents: tuple[Mapping[str, str], ...] = ()
    structured: StructuredOutputSpec | None = None  # the output constraint, from any spelling

    @property
    def num_candidates(self) -> int:
        """How many sequences run: best_of (beam width, with beam search), else n."""
        return max(self.n, self.search.best_of or self.n)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str  # the token's text, or "token_id:N" with return_tokens_as_token_ids
    logprob: float
    bytes: tuple[int, ...]  # the token's own bytes (a piece of a character stays a piece)


@dataclass(frozen=True, slots=True)
class LogprobEntry:
    """One generated token: its logprob and the `top` most likely alternatives, best first."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True, slots=True)
class PromptLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token at its position
    decoded_token: str


# One entry per prompt token, the first None (nothing predicts it); each the prompt token itself
# followed by the top k (the prompt token appears once even when it is among them).
PromptLogprobs = tuple[tuple[PromptLogprob, ...] | None, ...]


@dataclass(frozen=True, slots=True)
class ToolCallResult:
    id: str  # call_..., unique within a response
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True, slots=True)
class ToolCallChunk:
    """A piece of one streamed call: `id` and `name` on its first piece only."""

    index: int  # which call of the choice
    id: str | None
    name: str | None
    arguments: str  # a fragment; a call's fragments concatenate to its JSON arguments


@dataclass(frozen=True, slots=True)
class ChoiceResult:
    index: int
    text: str  # the answer's content, without reasoning or tool-call markup
    finish_reason: str | None
    stop_reason: str | int | None
    token_ids: tuple[int, ...]
    logprobs: tuple[LogprobEntry, ...] | None = None  # None unless the client asked
    cumulative_logprob: float | None = None  # known when the engine reported logprobs
    reasoning: str | None = None
    tool_calls: tuple[ToolCallResult, ...] = ()


@dataclass(frozen=True, slots=True)
class ChatResult:
    request_id: str
    created: int
    choices: tuple[ChoiceResult, ...]
    usage: Usage
    prompt_token_ids: tuple[int, ...]
    prompt_logprobs: PromptLogprobs | None = None


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """One streamed piece of one choice; `usage` is the running total when asked for per chunk.

    `token_ids` and `logprobs` are the tokens behind this piece (tokens whose text was held back
    ride along with the next piece that shows text). `prompt_logprobs` comes once, on the first
    piece of choice 0 that carries tokens.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage
    logprobs: tuple[LogprobEntry, ...] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallChunk, ...] = ()
