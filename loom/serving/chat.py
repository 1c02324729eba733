"""One chat call -> engine requests -> one `ChatResult` or a stream of `ChoiceDelta`s.

Owns how the `n` answers are produced: `n` independent samples; `best_of` samples of which the
`n` with the highest cumulative logprob are kept; or a beam search of width max(n, best_of)
(`beam_search`). Also merges the choices' outputs, logprobs and usage. Preparing the request
(prompt, checks, params) is `prepare`'s. Never touches tensors or HTTP.

Usage counts what the engine did: `prompt_tokens` once per call, `completion_tokens` every token
the engine generated for it (all best_of candidates, every beam step), `cached_tokens` the
prompt tokens every sequence found in the prefix cache (the minimum over them).

A stream of best_of > n or of a beam search is buffered: which answers win is known only at the
end, so their text arrives in one piece per choice once the search is over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

from loom.engine import AsyncEngine, EngineError, RequestOutput
from loom.engine.grammar import DEFAULT_BACKEND
from loom.engine.logprobs import TokenLogprob
from loom.serving.beam_search import BeamSearch, BeamSearchSpec, beam_logprobs, resolved_max_tokens
from loom.serving.chat_prompt import ParserConfig, output_plan, render_chat_prompt
from loom.serving.choice_output import ChoiceOutput, Piece, collect
from loom.serving.logprobs import LogprobFormatter, cumulative_logprob
from loom.serving.prepare import PreparedChat, prepare
from loom.serving.produced import Produced, PromptTally
from loom.serving.structured import StructuredOutputCompiler, StructuredOutputSpec
from loom.serving.templates import TemplateRenderer
from loom.serving.thinking import reasoning_phases, thinking_budget
from loom.serving.types import (
    ChatRequest,
    ChatResult,
    ChoiceDelta,
    ChoiceResult,
    InvalidRequest,
    PromptLogprobs,
    ToolCallChunk,
    ToolCallResult,
    Usage,
)
from loom.tokenizer import Tokenizer

T = TypeVar("T")
_Item = tuple[int, RequestOutput] | BaseException | None


@dataclass(slots=True)
class _Run:
    """What one engine sequence produced, as the engine reported it."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    records: list[TokenLogprob] | None = None
    prompt_records: tuple[TokenLogprob | None, ...] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.token_ids.extend(out.new_token_ids)
        if out.logprobs is not None:
            if self.records is None:
                self.records = []
            self.records.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_records = out.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


class ChatService:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        renderer: TemplateRenderer,
        parsers: ParserConfig | None = None,
        structured_backend: str = DEFAULT_BACKEND,
        structured: StructuredOutputCompiler | None = None,
    ) -> None:
        """`structured`: a compiler already built (and warmed) for this engine's tokenizer."""
        self.engine = engine
        self.renderer = renderer
        self.model_name = model_name
        self.parsers = parsers or ParserConfig()
        self.structured = structured or StructuredOutputCompiler(engine.tokenizer, default_backend=structured_backend)

    async def prepare(self, req: ChatRequest) -> PreparedChat:
        """Raises `InvalidRequest` for anything the model cannot honor, before any work starts.

        Rendering and tokenizing run off the event loop: a large prompt never stalls other requests."""
        tok = self.engine.tokenizer
        text = await render_chat_prompt(req, tok, self.renderer, self.parsers)
        prep = await asyncio.to_thread(prepare, req, text, self.engine)
        plan = output_plan(req, self.parsers)
        sampling = prep.sampling
        constraint = _constraint(req)
        # compiled off the loop within its budget; a bad one is a 422 here
        grammar = await self.structured.compile(constraint) if constraint is not None else None
        if self.parsers.reasoning_parser is not None:  # thinking stays free; the budget closes it
            budget = thinking_budget(req.reasoning.effort, req.reasoning.budget)
            grammar = reasoning_phases(self.parsers.reasoning_parser, text, tok, budget, grammar) or grammar
        if grammar is not None:
            sampling = dataclasses.replace(sampling, grammar=grammar)
        if sampling.skip_special_tokens and _spells_special_tokens(ChoiceOutput(plan).markers, tok):
            sampling = dataclasses.replace(sampling, skip_special_tokens=False)  # the parser must see them
        return dataclasses.replace(prep, sampling=sampling, output=plan, prompt_text=text)

    def _formatter(self, prep: PreparedChat) -> LogprobFormatter:
        return LogprobFormatter(self.engine.tokenizer, prep.req.report.tokens_as_ids)

    def _streams(self, prep: PreparedChat, tally: PromptTally | None = None) -> list[AsyncIterator[RequestOutput]]:
        req = prep.req
        nonce = uuid.uuid4().hex[:8]  # engine ids are unique even when clients reuse a request_id
        streams = [
            self.engine.generate(f"{req.request_id}-{i}-{nonce}", prep.prompt_ids, p, req.priority, req.cache_salt)
            for i, p in enumerate(prep.candidate_params())
        ]
        return streams if tally is None else [tally.observe(s) for s in streams]

    async def complete(self, prep: PreparedChat, produced: Produced | None = None) -> ChatResult:
        """`produced` (optional) counts the engine's outputs as they come: a caller that cancels
        this call still knows what was made."""
        tally = produced.prompt(len(prep.prompt_ids)) if produced is not None else None
        if prep.req.search.beam_search:
            return await self._beam_search(prep, tally)
        runs = await asyncio.gather(*(_collect(s) for s in self._streams(prep, tally)))
        return self._sampled_result(prep, list(runs))

    def _sampled_result(self, prep: PreparedChat, runs: list[_Run]) -> ChatResult:
        req, fmt = prep.req, self._formatter(prep)
        order = list(range(req.n))
        cums = [None if r.records is None else cumulative_logprob(r.records) for r in runs]
        if len(runs) > req.n:  # best_of: the n most likely candidates, most likely first
            order = sorted(range(len(runs)), key=lambda i: -_required(cums[i]))[: req.n]
        choices = []
        for index, i in enumerate(order):
            run = runs[i]
            logprobs = fmt.entries(_required(run.records), req.report.top_logprobs) if req.report.logprobs else None
            base = ChoiceResult(
                index, "".join(run.text), run.finish_reason, run.stop_reason, tuple(run.token_ids), logprobs, cums[i]
            )
            choices.append(_parsed_result(prep, base))
        usage = Usage(len(prep.prompt_ids), sum(len(r.token_ids) for r in runs), min(r.num_cached_tokens for r in runs))
        prompt_logprobs = self._prompt_logprobs(prep, fmt, runs[0].prompt_records)
        return ChatResult(req.request_id, int(time.time()), tuple(choices), usage, prep.prompt_ids, prompt_logprobs)

    def _prompt_logprobs(
        self, prep: PreparedChat, fmt: LogprobFormatter, records: tuple[TokenLogprob | None, ...] | None
    ) -> PromptLogprobs | None:
        if prep.req.report.prompt_logprobs is None:
            return None
        return fmt.prompt(_required(records))

    async def _beam_search(self, prep: PreparedChat, tally: PromptTally | None = None) -> ChatResult:
        req, fmt = prep.req, self._formatter(prep)
        spec = BeamSearchSpec(
            req_id=req.request_id,
            prompt_ids=prep.prompt_ids,
            sampling=prep.sampling,
            width=req.num_candidates,
            length_penalty=req.search.length_penalty,
            max_tokens=resolved_max_tokens(prep.sampling, len(prep.prompt_ids), self.engine.max_model_len),
            num_logprobs=beam_logprobs(req.num_candidates, req.report.top_logprobs if req.report.logprobs else 0),
            priority=req.priority,
            cache_salt=req.cache_salt,
        )
        search = BeamSearch(self.engine, spec)
        try:
            found = await search.run()
        finally:
            if tally is not None:
                tally.searched(*search.produced)
        choices = tuple(
            _parsed_result(
                prep,
                ChoiceResult(
                    index, beam.text, beam.finish_reason, beam.stop_reason, beam.token_ids,
                    fmt.entries(beam.logprobs, req.report.top_logprobs) if req.report.logprobs else None,
                    beam.cum_logprob,
                ),
            )
            for index, beam in enumerate(found.beams[: req.n])
        )  # fmt: skip
        usage = Usage(len(prep.prompt_ids), found.num_generated_tokens, found.num_cached_tokens)
        prompt_logprobs = self._prompt_logprobs(prep, fmt, found.prompt_logprobs)
        return ChatResult(req.request_id, int(time.time()), choices, usage, prep.prompt_ids, prompt_logprobs)

    async def stream(self, prep: PreparedChat, produced: Produced | None = None) -> AsyncIterator[ChoiceDelta]:
        """Yields deltas of all choices as they come; closing it aborts every unfinished sequence."""
        if prep.req.search.beam_search or prep.req.num_candidates > prep.req.n:
            result = await self.complete(prep, produced)
            for choice in result.choices:
                yield ChoiceDelta(
                    choice.index, choice.text, choice.token_ids, choice.finish_reason, choice.stop_reason,
                    result.usage, choice.logprobs, result.prompt_logprobs if choice.index == 0 else None,
                    choice.reasoning or "", _whole_calls(choice.tool_calls),
                )  # fmt: skip
            return
        async for delta in self._stream_sampled(prep, produced):
            yield delta

    async def _stream_sampled(self, prep: PreparedChat, produced: Produced | None) -> AsyncIterator[ChoiceDelta]:
        req, fmt = prep.req, self._formatter(prep)
        merger = _DeltaMerger(prep, fmt)
        for index in range(req.n):
            if prep.echo:
                yield ChoiceDelta(index, prep.echo, (), None, None, merger.usage(), () if req.report.logprobs else None)
        outputs = None if prep.output.is_plain else [ChoiceOutput(prep.output, prep.prompt_text) for _ in range(req.n)]
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        tally = produced.prompt(len(prep.prompt_ids)) if produced is not None else None
        tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(self._streams(prep, tally))]
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    delta = merger.add(*item)
                    if delta is not None:
                        yield delta if outputs is None else _parsed_delta(outputs[delta.index], delta)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class _DeltaMerger:
    """Engine outputs of all choices -> deltas; tokens whose text is held back wait for the next."""

    def __init__(self, prep: PreparedChat, fmt: LogprobFormatter) -> None:
        self.prep, self.fmt = prep, fmt
        n = prep.req.n
        self.num_output = [0] * n
        self.num_cached: list[int | None] = [None] * n
        self.pending_ids: list[list[int]] = [[] for _ in range(n)]
        self.pending_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.prompt_records: tuple[TokenLogprob | None, ...] | None = None
        self.prompt_sent = prep.req.report.prompt_logprobs is None

    def usage(self) -> Usage:
        cached = [c for c in self.num_cached if c is not None]
        return Usage(len(self.prep.prompt_ids), sum(self.num_output), min(cached, default=0))

    def add(self, index: int, out: RequestOutput) -> ChoiceDelta | None:
        report = self.prep.req.report
        self.num_output[index] = out.num_output_tokens
        self.num_cached[index] = max(self.num_cached[index] or 0, out.num_cached_tokens)
        self.pending_ids[index].extend(out.new_token_ids)
        if report.logprobs:
            self.pending_logprobs[index].extend(_required(out.logprobs))
        if out.prompt_logprobs is not None:
            self.prompt_records = out.prompt_logprobs
        if not out.new_text and out.finish_reason is None:
            return None
        prompt_logprobs = None
        if index == 0 and not self.prompt_sent:
            prompt_logprobs, self.prompt_sent = self.fmt.prompt(_required(self.prompt_records)), True
        logprobs = self.fmt.entries(self.pending_logprobs[index], report.top_logprobs) if report.logprobs else None
        delta = ChoiceDelta(
            index, out.new_text, tuple(self.pending_ids[index]), out.finish_reason, out.stop_reason,
            self.usage(), logprobs, prompt_logprobs,
        )  # fmt: skip
        self.pending_ids[index], self.pending_logprobs[index] = [], []
        return delta


def _parsed_result(prep: PreparedChat, choice: ChoiceResult) -> ChoiceResult:
    """The whole text read back: content (after the echo), reasoning, tool calls, finish_reason."""
    if prep.output.is_plain:
        return dataclasses.replace(choice, text=prep.echo + choice.text)
    out = ChoiceOutput(prep.output, prep.prompt_text)
    content, reasoning, calls = collect(out, choice.text)
    return dataclasses.replace(
        choice, text=prep.echo + content, reasoning=reasoning, tool_calls=calls,
        finish_reason=out.finish_reason(choice.finish_reason),
    )  # fmt: skip


def _parsed_delta(out: ChoiceOutput, delta: ChoiceDelta) -> ChoiceDelta:
    piece = out.feed(delta.text)
    if delta.finish_reason is not None:
        tail = out.finish()
        piece = Piece(
            piece.content + tail.content, piece.reasoning + tail.reasoning, piece.tool_calls + tail.tool_calls
        )
    return dataclasses.replace(
        delta, text=piece.content, reasoning=piece.reasoning, tool_calls=piece.tool_calls,
        finish_reason=out.finish_reason(delta.finish_reason),
    )  # fmt: skip


def _whole_calls(calls: tuple[ToolCallResult, ...]) -> tuple[ToolCallChunk, ...]:
    return tuple(ToolCallChunk(i, c.id, c.name, c.arguments) for i, c in enumerate(calls))


def _spells_special_tokens(markers: tuple[str, ...], tok: Tokenizer) -> bool:
    """Whether any parser marker is one special token (hidden by skip_special_tokens)."""
    for marker in markers:
        ids = tok.encode(marker, add_special_tokens=False)
        if len(ids) == 1 and ids[0] in tok.all_special_ids:
            return True
    return False


def _required(value: T | None) -> T:
    """Logprobs the engine was asked for; their absence is an engine fault, not an empty answer."""
    if value is None:
        raise EngineError("the engine did not report the logprobs it was asked for")
    return value


async def _pump(index: int, stream: AsyncIterator[RequestOutput], queue: asyncio.Queue[_Item]) -> None:
    try:
        async with aclosing(stream) as outputs:  # type: ignore[type-var]
            async for out in outputs:
                queue.put_nowait((index, out))
    except Exception as exc:
        queue.put_nowait(exc)
    finally:
        queue.put_nowait(None)


async def _collect(stream: AsyncIterator[RequestOutput]) -> _Run:
    run = _Run()
    async with aclosing(stream) as outputs:  # type: ignore[type-var]
        async for out in outputs:
            run.add(out)
    if not run.token_ids and run.finish_reason is None:
        raise RuntimeError("engine produced no output")
    return run


def _constraint(req: ChatRequest) -> StructuredOutputSpec | None:
    """The output constraint: the request's own, or a forced tool call's; both at once is a 422."""
    forced = req.tools.constraint() if req.tools is not None else None
    if forced is not None and req.structured is not None:
        raise InvalidRequest(
            f"'{req.structured.param}' does not combine with a forced tool call (tool_choice)", "tool_choice", 422
        )
    return forced or req.structured
