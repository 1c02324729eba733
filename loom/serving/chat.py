"""One chat call -> `n` engine requests -> one `ChatResult` or a stream of `ChoiceDelta`s.

Owns prompt rendering and tokenization, the context-window check, per-choice sampling params,
merging the choices' outputs and usage. Never touches tensors or HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator

from loom.engine import AsyncEngine, RequestOutput, SamplingParams
from loom.serving.templates import render_chat
from loom.serving.types import ChatRequest, ChatResult, ChoiceDelta, ChoiceResult, InvalidRequest, Usage


class ChatService:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def tokenize_prompt(self, req: ChatRequest) -> list[int]:
        tok = self.engine.tokenizer
        special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
        text = render_chat(req.messages, req.template, tok.chat_template, special)
        prompt_ids = tok.encode(text, add_special_tokens=req.template.add_special_tokens)
        self._check_context(len(prompt_ids), req.sampling.max_tokens)
        return prompt_ids

    def _check_context(self, num_prompt: int, max_tokens: int | None) -> None:
        limit = self.engine.max_model_len
        wanted = num_prompt + (max_tokens or 1)
        if wanted > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested {wanted} tokens "
                f"({num_prompt} in the messages, {max_tokens or 1} in the completion). "
                "Please reduce the length of the messages or completion.",
                "messages",
            )

    def _choice_params(self, req: ChatRequest) -> list[SamplingParams]:
        seed = req.sampling.seed
        if seed is None or req.n == 1:
            return [req.sampling] * req.n
        # n choices must be independent yet reproducible: each gets its own seed
        return [dataclasses.replace(req.sampling, seed=seed + i) for i in range(req.n)]

    def _streams(self, req: ChatRequest, prompt_ids: list[int]) -> list[AsyncIterator[RequestOutput]]:
        # engine ids are unique even when clients reuse a request_id (as vLLM allows)
        nonce = uuid.uuid4().hex[:8]
        return [
            self.engine.generate(f"{req.request_id}-{i}-{nonce}", prompt_ids, p)
            for i, p in enumerate(self._choice_params(req))
        ]

    async def complete(self, req: ChatRequest) -> ChatResult:
        prompt_ids = self.tokenize_prompt(req)
        choices = await asyncio.gather(*(_collect(i, s) for i, s in enumerate(self._streams(req, prompt_ids))))
        usage = Usage(len(prompt_ids), sum(len(c.token_ids) for c in choices))
        return ChatResult(req.request_id, int(time.time()), tuple(choices), usage, tuple(prompt_ids))

    async def stream(self, req: ChatRequest, prompt_ids: list[int]) -> AsyncIterator[ChoiceDelta]:
        """Yields deltas of all choices as they come; closing it aborts every unfinished choice."""
        queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()
        streams = self._streams(req, prompt_ids)
        tasks = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams)]
        completion_tokens = [0] * req.n
        try:
            for _ in range(len(tasks)):
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    index, out = item
                    completion_tokens[index] = out.num_output_tokens
                    usage = Usage(len(prompt_ids), sum(completion_tokens))
                    yield ChoiceDelta(
                        index, out.new_text, out.new_token_ids, out.finish_reason, out.stop_reason, usage
                    )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    index: int,
    stream: AsyncIterator[RequestOutput],
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None],
) -> None:
    try:
        async for out in stream:
            queue.put_nowait((index, out))
    except Exception as exc:
        queue.put_nowait(exc)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
        queue.put_nowait(None)


async def _collect(index: int, stream: AsyncIterator[RequestOutput]) -> ChoiceResult:
    text: list[str] = []
    token_ids: list[int] = []
    last: RequestOutput | None = None
    async for out in stream:
        text.append(out.new_text)
        token_ids.extend(out.new_token_ids)
        last = out
    if last is None:
        raise RuntimeError("engine produced no output")
    return ChoiceResult(index, "".join(text), last.finish_reason, last.stop_reason, tuple(token_ids))
