"""`ChatService` over a scripted engine: best_of keeps the most likely candidates, usage counts every
generated token, and a stream lets tokens whose text is held back ride with the next piece."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence

import pytest
from toy_engine import ToyTokenizer

from loom.engine import RequestOutput, SamplingParams
from loom.engine.logprobs import TokenLogprob
from loom.serving.chat import ChatService
from loom.serving.sampling import SamplingOptions
from loom.serving.templates import TemplateRenderer
from loom.serving.types import ChatMessage, ChatRequest, ReportOptions, SearchOptions

# Per candidate: the steps (token id, text shown, logprob); "" = text held back.
SCRIPTS = [
    [(0, "a", -1.0), (1, "b", -1.0)],  # cumulative -2.0
    [(2, "", -0.1), (3, "c.", -0.2)],  # -0.3: the best
    [(0, "a", -0.5), (4, "", -0.5)],  # -1.0, ends on EOS (no text)
]


class ScriptedEngine:
    def __init__(self) -> None:
        self.tokenizer = ToyTokenizer()
        self.max_model_len = 64
        self.scheduling_policy = "fcfs"
        self.params: list[SamplingParams] = []

    async def generate(
        self, req_id: str, prompt_ids: Sequence[int], params: SamplingParams, priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:  # fmt: skip
        self.params.append(params)
        script = SCRIPTS[int(req_id.split("-")[1])]
        for step, (token_id, text, logprob) in enumerate(script, start=1):
            last = step == len(script)
            record = TokenLogprob(token_id, logprob, 1, ((token_id, logprob),))
            prompt_records = (None, TokenLogprob(0, -1.0, 1, ())) if step == 1 and params.prompt_logprobs is not None else None
            yield RequestOutput(
                req_id, (token_id,), text, last, "length" if last else None, None, len(prompt_ids), step,
                (record,) if params.logprobs is not None else None, prompt_records, 3,
            )  # fmt: skip


def request(**fields: object) -> ChatRequest:
    return ChatRequest("r", (ChatMessage("user", "ab"),), SamplingOptions(max_tokens=2), **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def renderer() -> Iterator[TemplateRenderer]:
    r = TemplateRenderer()
    yield r
    r.close()


async def test_best_of_keeps_the_most_likely_and_counts_every_candidate(renderer: TemplateRenderer) -> None:
    service = ChatService(ScriptedEngine(), "toy", renderer)  # type: ignore[arg-type]
    req = request(n=2, search=SearchOptions(best_of=3))
    result = await service.complete(await service.prepare(req))
    assert [c.token_ids for c in result.choices] == [(2, 3), (0, 4)]
    assert [c.index for c in result.choices] == [0, 1]
    assert all(c.logprobs is None for c in result.choices)
    assert result.usage.completion_tokens == 6
    assert result.usage.cached_tokens == 3


async def test_held_back_tokens_ride_with_the_next_piece(renderer: TemplateRenderer) -> None:
    service = ChatService(ScriptedEngine(), "toy", renderer)  # type: ignore[arg-type]
    req = request(n=2, report=ReportOptions(logprobs=True, token_ids=True, prompt_logprobs=0))
    deltas = [d async for d in service.stream(await service.prepare(req))]
    second = [d for d in deltas if d.index == 1]
    assert [(d.text, d.token_ids) for d in second] == [("c.", (2, 3))]
    assert second[0].logprobs is not None and len(second[0].logprobs) == 2
    with_prompt = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(with_prompt) == 1 and with_prompt[0].index == 0
    assert deltas[-1].usage.completion_tokens == 4


async def test_echo_comes_first_in_a_stream_and_in_front_of_the_text(renderer: TemplateRenderer) -> None:
    service = ChatService(ScriptedEngine(), "toy", renderer)  # type: ignore[arg-type]
    messages = (ChatMessage("user", "ab"), ChatMessage("assistant", "ca"))
    req = ChatRequest("r", messages, SamplingOptions(max_tokens=2), report=ReportOptions(echo=True))
    deltas = [d async for d in service.stream(await service.prepare(req))]
    assert deltas[0].text == "ca" and deltas[0].token_ids == ()
    assert "".join(d.text for d in deltas) == "caab"
    result = await service.complete(await service.prepare(req))
    assert result.choices[0].text == "caab"


async def test_a_buffered_best_of_stream_says_what_the_blocking_answer_says(renderer: TemplateRenderer) -> None:
    service = ChatService(ScriptedEngine(), "toy", renderer)  # type: ignore[arg-type]
    req = request(n=1, search=SearchOptions(best_of=3))
    deltas = [d async for d in service.stream(await service.prepare(req))]
    assert [(d.index, d.text, d.finish_reason) for d in deltas] == [(0, "c.", "length")]
