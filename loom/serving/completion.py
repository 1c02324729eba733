"""One completions call (`/v1/completions`): prompts as text or token ids -> engine runs -> one
`CompletionResult` or a stream of `CompletionDelta`s, choices indexed prompt-major (prompt i,
sample j -> index i * n + j, as vLLM's).

Owns the prompt side of a completion: tokenizing text prompts or checking given token ids against
the vocabulary, truncation (`truncate_prompt_tokens`), the context-window and `min_tokens` checks,
`echo` (the prompt's text first; with `logprobs`, the prompt tokens' logprobs first too, from the
engine's prompt logprobs, the first token's `None`: what lm-eval's loglikelihood reads), and the
legacy logprobs entries (`TokenScore`). Each prompt is one `PreparedChat` that `ChatService` runs,
so n, best_of, beam search and an output constraint (compiled once for all prompts) behave as in
chat; the text is never parsed (no tool calls or reasoning). Never touches tensors or HTTP.

`echo_only` is `max_tokens: 0` with echo: the engine runs one token (prompt logprobs come with the
first step) and the answer shows the prompt alone, `finish_reason` "length"; usage counts the
token the engine did generate.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from loom.engine import AsyncEngine, EngineError, SamplingParams
from loom.serving.chat import ChatService
from loom.serving.logprobs import LogprobFormatter
from loom.serving.prepare import (
    PreparedChat,
    bad_words_ids,
    check_min_tokens,
    check_priority,
    check_token_ids,
    engine_logprobs,
)
from loom.serving.produced import Produced
from loom.serving.sampling import engine_params
from loom.serving.types import ChatRequest, ChoiceDelta, InvalidRequest, LogprobEntry, PromptLogprobs, Usage
from loom.tokenizer import Tokenizer

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """`base` carries everything but the prompts (its `messages` are empty): sampling, n, search,
    scheduling, and what to report (`report.logprobs` / `top_logprobs` from the legacy `logprobs`
    count, `report.prompt_logprobs` as the client asked). `template.add_special_tokens` applies
    to text prompts."""

    base: ChatRequest
    prompts: tuple[str | tuple[int, ...], ...]
    echo: bool = False
    echo_only: bool = False  # max_tokens 0 with echo; `base.sampling.max_tokens` is then 1


@dataclass(frozen=True, slots=True)
class PreparedPrompt:
    chat: PreparedChat  # what ChatService runs; its own echo is off (this module echoes)
    text: str  # the prompt as text, for echo: as sent, or decoded from (kept) token ids


@dataclass(frozen=True, slots=True)
class PreparedCompletion:
    req: CompletionRequest
    prompts: tuple[PreparedPrompt, ...]


@dataclass(frozen=True, slots=True)
class TokenScore:
    """One token of the legacy logprobs: `top` is the k most likely and the token itself."""

    token: str
    logprob: float | None  # None: a prompt's first token, which nothing predicts
    top: tuple[tuple[str, float], ...] | None


@dataclass(frozen=True, slots=True)
class CompletionChoice:
    index: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenScore, ...] | None  # None unless the client asked
    prompt_index: int  # which prompt: its ids and prompt logprobs are the result's


@dataclass(frozen=True, slots=True)
class CompletionResult:
    request_id: str
    created: int
    choices: tuple[CompletionChoice, ...]
    usage: Usage  # summed over the prompts
    prompt_token_ids: tuple[tuple[int, ...], ...]  # per prompt
    prompt_logprobs: tuple[PromptLogprobs | None, ...]  # per prompt, top k as the client asked


@dataclass(frozen=True, slots=True)
class CompletionDelta:
    """One streamed piece of one choice. `prompt_token_ids` come on each choice's first piece;
    `prompt_logprobs` once per prompt, on the piece of its first choice that carries them."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stop_reason: str | int | None
    usage: Usage  # the running total over all prompts
    logprobs: tuple[TokenScore, ...] | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_logprobs: PromptLogprobs | None = None


# ---- preparing ------------------------------------------------------------------------------


async def prepare(chat: ChatService, req: CompletionRequest) -> PreparedCompletion:
    """Raises `InvalidRequest` for anything the model cannot honor, before any work starts. Tokenizing
    runs in a worker thread; an output constraint compiles once, off the loop, for every prompt."""
    prep = await asyncio.to_thread(prepare_completion, req, chat.engine)
    if req.base.structured is None:
        return prep
    grammar = await chat.structured.compile(req.base.structured)
    prompts = tuple(
        dataclasses.replace(
            p, chat=dataclasses.replace(p.chat, sampling=dataclasses.replace(p.chat.sampling, grammar=grammar))
        )
        for p in prep.prompts
    )
    return dataclasses.replace(prep, prompts=prompts)


def prepare_completion(req: CompletionRequest, engine: AsyncEngine) -> PreparedCompletion:
    """Blocking (tokenizes): callers on an event loop run it in a worker thread."""
    tok, base = engine.tokenizer, req.base
    check_priority(base, engine.scheduling_policy)
    check_token_ids(base.sampling, tok.vocab_size)
    report = base.report
    engine_prompt_k = report.prompt_logprobs
    if req.echo and report.logprobs:  # the echoed prompt's tokens need their logprobs, as vLLM's
        engine_prompt_k = max(engine_prompt_k or 0, report.top_logprobs)
    run = dataclasses.replace(base, report=dataclasses.replace(report, prompt_logprobs=engine_prompt_k, echo=False))
    sampling = engine_params(
        base.sampling,
        vocab_size=tok.vocab_size,
        bad_words_ids=bad_words_ids(base.bad_words, tok),
        logprobs=engine_logprobs(base),
        prompt_logprobs=engine_prompt_k,
    )
    prompts = tuple(_prepare_prompt(i, p, run, sampling, engine) for i, p in enumerate(req.prompts))
    return PreparedCompletion(req, prompts)


def _prepare_prompt(
    index: int, prompt: str | tuple[int, ...], run: ChatRequest, sampling: SamplingParams, engine: AsyncEngine
) -> PreparedPrompt:
    tok, limit = engine.tokenizer, engine.max_model_len
    if isinstance(prompt, str):
        ids = tok.encode(prompt, add_special_tokens=run.template.add_special_tokens)
    else:
        ids = list(prompt)
        _check_in_vocabulary(index, ids, tok.vocab_size)
    kept = _truncated(ids, run.truncate_prompt_tokens, sampling.max_tokens, limit)
    if not kept:
        raise InvalidRequest(f"prompt {index} is empty: it has no tokens to continue", "prompt")
    wanted = len(kept) + (sampling.max_tokens or 1)
    if wanted > limit:
        raise InvalidRequest(
            f"This model's maximum context length is {limit} tokens. However, you requested {wanted} tokens "
            f"({len(kept)} in prompt {index}, {sampling.max_tokens or 1} in the completion). "
            "Please reduce the length of the prompt or completion.",
            "prompt",
        )
    check_min_tokens(sampling, len(kept), limit)
    text = prompt if isinstance(prompt, str) and len(kept) == len(ids) else tok.decode(kept)
    return PreparedPrompt(PreparedChat(run, tuple(kept), sampling, echo=""), text)


def _check_in_vocabulary(index: int, ids: Sequence[int], vocab_size: int) -> None:
    outside = sorted({i for i in ids if i >= vocab_size})  # the wire model refused negatives
    if outside:
        raise InvalidRequest(
            f"prompt {index} has token ids outside the vocabulary (0..{vocab_size - 1}): {outside[:5]}",
            "prompt",
            status_code=422,
        )


def _truncated(ids: list[int], keep: int | None, max_tokens: int | None, limit: int) -> list[int]:
    if keep == -1:  # the model's limit: as much as leaves room for the completion
        keep = max(1, limit - (max_tokens or 1))
    return ids[-keep:] if keep is not None and len(ids) > keep else ids


# ---- legacy logprobs --------------------------------------------------------------------------


def _top(own: tuple[str, float], others: Iterable[tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """The token itself first, then the alternatives; one entry per text (the wire keys by text)."""
    seen, top = {own[0]}, [own]
    for token, logprob in others:
        if token not in seen:
            seen.add(token)
            top.append((token, logprob))
    return tuple(top)


def generated_scores(entries: Sequence[LogprobEntry]) -> tuple[TokenScore, ...]:
    return tuple(
        TokenScore(e.token, e.logprob, _top((e.token, e.logprob), ((t.token, t.logprob) for t in e.top)))
        for e in entries
    )


def prompt_scores(
    fmt: LogprobFormatter, prompt_ids: Sequence[int], entries: PromptLogprobs, k: int
) -> tuple[TokenScore, ...]:
    """The echoed prompt's tokens: the first has no logprob; each other its own and the top k."""
    scores = []
    for token_id, position in zip(prompt_ids, entries, strict=True):
        if position is None:
            scores.append(TokenScore(fmt.token(token_id)[0], None, None))
            continue
        own, *rest = position
        alternatives = ((e.decoded_token, e.logprob) for e in rest if e.rank <= k)
        scores.append(TokenScore(own.decoded_token, own.logprob, _top((own.decoded_token, own.logprob), alternatives)))
    return tuple(scores)


def trimmed(entries: PromptLogprobs, k: int) -> PromptLogprobs:
    """Prompt logprobs computed with more alternatives than the client asked for, cut to its k."""
    return tuple(
        None if pos is None else tuple(e for n, e in enumerate(pos) if n == 0 or e.rank <= k) for pos in entries
    )


class _Shaper:
    """Turns one prompt's choice output into what the client sees: echo first, generation hidden
    for echo_only, legacy logprobs."""

    def __init__(self, prep: PreparedCompletion, tok: Tokenizer) -> None:
        self.prep, self.req = prep, prep.req
        self.fmt = LogprobFormatter(tok, prep.req.base.report.tokens_as_ids)
        self.prompt_entries: list[PromptLogprobs | None] = [None] * len(prep.prompts)
        self.needs_prompt_entries = prep.req.echo and prep.req.base.report.logprobs

    def index(self, prompt_index: int, choice_index: int) -> int:
        return prompt_index * self.req.base.n + choice_index

    def shape(
        self, prompt_index: int, delta: ChoiceDelta, first: bool
    ) -> tuple[str, tuple[int, ...], tuple[TokenScore, ...] | None, str | None, str | int | None]:
        """(text, token_ids, logprobs, finish_reason, stop_reason) of one piece of one choice."""
        report = self.req.base.report
        text, token_ids, finish, stop = delta.text, delta.token_ids, delta.finish_reason, delta.stop_reason
        scores = generated_scores(delta.logprobs or ()) if report.logprobs else None
        if self.req.echo_only:
            text, token_ids, scores = "", (), () if report.logprobs else None
            finish, stop = ("length" if finish is not None else None), None
        if first and self.req.echo:
            prompt = self.prep.prompts[prompt_index]
            text = prompt.text + text
            if scores is not None:
                entries = self.prompt_entries[prompt_index]
                if entries is None:  # asked of the engine with the first step: their absence is its fault
                    raise EngineError("the engine did not report the prompt logprobs it was asked for")
                scores = prompt_scores(self.fmt, prompt.chat.prompt_ids, entries, report.top_logprobs) + scores
        return text, token_ids, scores, finish, stop

    def client_prompt_logprobs(self, entries: PromptLogprobs | None) -> PromptLogprobs | None:
        k = self.req.base.report.prompt_logprobs
        return None if entries is None or k is None else trimmed(entries, k)


# ---- running ---------------------------------------------------------------------------------


async def complete(chat: ChatService, prep: PreparedCompletion, produced: Produced | None = None) -> CompletionResult:
    """`produced` (optional) counts every prompt's engine outputs as they come (see `Produced`)."""
    results = await _all([chat.complete(p.chat, produced) for p in prep.prompts])
    shaper = _Shaper(prep, chat.engine.tokenizer)
    choices = []
    for i, result in enumerate(results):
        shaper.prompt_entries[i] = result.prompt_logprobs
        for c in result.choices:
            piece = ChoiceDelta(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, result.usage, c.logprobs)
            text, token_ids, scores, finish, stop = shaper.shape(i, piece, first=True)
            choices.append(CompletionChoice(shaper.index(i, c.index), text, finish, stop, token_ids, scores, i))
    return CompletionResult(
        prep.req.base.request_id,
        results[0].created,
        tuple(choices),
        summed([r.usage for r in results]),
        tuple(p.chat.prompt_ids for p in prep.prompts),
        tuple(shaper.client_prompt_logprobs(r.prompt_logprobs) for r in results),
    )


def summed(usages: Sequence[Usage]) -> Usage:
    return Usage(
        sum(u.prompt_tokens for u in usages),
        sum(u.completion_tokens for u in usages),
        sum(u.cached_tokens for u in usages),
    )


async def _all(works: Sequence[Awaitable[T]]) -> list[T]:
    """Runs them together; the first failure, or a cancellation, cancels the others."""
    tasks = [asyncio.ensure_future(w) for w in works]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


_Item = tuple[int, ChoiceDelta] | BaseException | None


async def stream(
    chat: ChatService, prep: PreparedCompletion, produced: Produced | None = None
) -> AsyncIterator[CompletionDelta]:
    """Yields every prompt's choices' pieces as they come; closing it aborts every unfinished run."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(i, chat.stream(p.chat, produced), queue)) for i, p in enumerate(prep.prompts)]
    merger = _StreamMerger(prep, _Shaper(prep, chat.engine.tokenizer))
    try:
        for _ in range(len(tasks)):
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                for delta in merger.add(*item):
                    yield delta
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(index: int, deltas: AsyncIterator[ChoiceDelta], queue: asyncio.Queue[_Item]) -> None:
    try:
        async with aclosing(deltas) as pieces:  # type: ignore[type-var]
            async for delta in pieces:
                queue.put_nowait((index, delta))
    except Exception as exc:
        queue.put_nowait(exc)
    finally:
        queue.put_nowait(None)


class _StreamMerger:
    """Pieces of every prompt's run -> client deltas. With echo and logprobs a choice's first piece
    needs its prompt's logprobs, which ride on the prompt's first choice: pieces of that prompt
    wait until they have come."""

    def __init__(self, prep: PreparedCompletion, shaper: _Shaper) -> None:
        self.prep, self.shaper = prep, shaper
        self.usage = [Usage(len(p.chat.prompt_ids), 0) for p in prep.prompts]
        self.started: set[int] = set()
        self.held: list[list[ChoiceDelta]] = [[] for _ in prep.prompts]

    def total(self) -> Usage:
        return summed(self.usage)

    def add(self, prompt_index: int, delta: ChoiceDelta) -> list[CompletionDelta]:
        self.usage[prompt_index] = delta.usage
        if delta.prompt_logprobs is not None:
            self.shaper.prompt_entries[prompt_index] = delta.prompt_logprobs
        if self.shaper.needs_prompt_entries and self.shaper.prompt_entries[prompt_index] is None:
            self.held[prompt_index].append(delta)
            return []
        pieces, self.held[prompt_index] = [*self.held[prompt_index], delta], []
        return [self._delta(prompt_index, piece) for piece in pieces]

    def _delta(self, prompt_index: int, piece: ChoiceDelta) -> CompletionDelta:
        index = self.shaper.index(prompt_index, piece.index)
        first = index not in self.started
        self.started.add(index)
        text, token_ids, scores, finish, stop = self.shaper.shape(prompt_index, piece, first)
        show_ids = first and self.prep.req.base.report.token_ids
        return CompletionDelta(
            index, text, token_ids, finish, stop, self.total(), scores,
            self.prep.prompts[prompt_index].chat.prompt_ids if show_ids else None,
            self.shaper.client_prompt_logprobs(piece.prompt_logprobs),
        )  # fmt: skip
