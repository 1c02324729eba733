"""Beam search at the serving level, over one-token engine steps (as vLLM's serving beam search).

Each step asks the engine for one token per live beam (prompt + the beam's tokens as the
prompt; prefix caching makes the repeat cheap) with the top `2 * width` logprobs, extends every
beam by each of those candidates, and keeps the `width` best by cumulative logprob. A candidate
that is EOS (unless ignore_eos) or a stop token id finishes its beam without taking a live
slot; a beam whose text completes a stop string, or that reaches max_tokens or the context
window, finishes too. The search ends when no beam is live, or when no live beam can still beat
the `width` finished ones (the bound below). Finished beams are ranked by

    score = cumulative_logprob / (length ** length_penalty)

where length counts the output tokens without a final EOS / stop token (Hugging Face's rule;
vLLM counts the prompt too). Ties keep the earlier beam, so the search is deterministic.

Candidates are scored by the engine's logprobs of the model's distribution (greedy steps, no
penalties: raw and processed logprobs agree). It never samples and never touches tensors.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import aclosing
from dataclasses import dataclass, replace

from loom.engine import AsyncEngine, RequestOutput, SamplingParams
from loom.engine.detokenizer import IncrementalDetokenizer
from loom.engine.logprobs import TokenLogprob


@dataclass(frozen=True, slots=True)
class Beam:
    token_ids: tuple[int, ...]  # output ids, a final stop token included
    cum_logprob: float
    logprobs: tuple[TokenLogprob, ...]  # one per token id; `top` = the candidates of its step
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""  # set once finished
    num_scored: int = 0  # tokens the length penalty counts


@dataclass(frozen=True, slots=True)
class BeamSearchSpec:
    req_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams  # stopping, min_tokens, ignore_eos and text options of the request
    width: int
    length_penalty: float
    max_tokens: int  # resolved: the request's, or what the context window leaves
    num_logprobs: int  # candidates per beam per step (>= 2 * width)
    priority: int = 0
    cache_salt: str | None = None


@dataclass(frozen=True, slots=True)
class BeamSearchResult:
    beams: tuple[Beam, ...]  # the `width` best finished beams, best first
    num_generated_tokens: int  # every token the engine produced for the search
    num_cached_tokens: int  # of the first step's prompt
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None


def score(beam: Beam, length_penalty: float) -> float:
    return beam.cum_logprob / (max(beam.num_scored, 1) ** length_penalty)


class BeamSearch:
    def __init__(self, engine: AsyncEngine, spec: BeamSearchSpec) -> None:
        self.engine = engine
        self.spec = spec
        params = spec.sampling
        self._stop_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos or engine.tokenizer.eos_token_id is None
            else frozenset({engine.tokenizer.eos_token_id})
        )  # fmt: skip
        self._step_params = SamplingParams(
            max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=spec.num_logprobs,
            prompt_logprobs=params.prompt_logprobs,
        )  # fmt: skip
        self._nonce = uuid.uuid4().hex[:8]
        self._num_generated = 0
        self._num_cached = 0
        self._prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def produced(self) -> tuple[int, int]:
        """(tokens generated, prompt tokens cached) so far: what a search cancelled midway used."""
        return self._num_generated, self._num_cached

    async def run(self) -> BeamSearchResult:
        live = [Beam((), 0.0, ())]
        done: list[Beam] = []
        step = 0
        while live and not self._cannot_improve(live, done):
            records = await asyncio.gather(*(self._expand(step, i, beam) for i, beam in enumerate(live)))
            live, finished = self._select(live, records)
            done = self._best(done + finished)
            step += 1
        return BeamSearchResult(tuple(done), self._num_generated, self._num_cached, self._prompt_logprobs)

    async def _expand(self, step: int, index: int, beam: Beam) -> TokenLogprob:
        """One engine step on prompt + beam; returns the record of the token it would take next."""
        spec = self.spec
        params = self._step_params if step == 0 else replace(self._step_params, prompt_logprobs=None)
        last: RequestOutput | None = None
        stream = self.engine.generate(
            f"{spec.req_id}-beam{step}.{index}-{self._nonce}", spec.prompt_ids + beam.token_ids, params,
            spec.priority, spec.cache_salt,
        )  # fmt: skip
        async with aclosing(stream) as outputs:  # type: ignore[type-var]
            async for out in outputs:
                last = out
                if out.prompt_logprobs is not None:
                    self._prompt_logprobs = out.prompt_logprobs
        if last is None or not last.logprobs:
            raise RuntimeError("the engine reported no logprobs for a beam search step")
        self._num_generated += last.num_output_tokens
        if step == 0:
            self._num_cached = last.num_cached_tokens
        return last.logprobs[-1]

    def _select(self, live: list[Beam], records: list[TokenLogprob]) -> tuple[list[Beam], list[Beam]]:
        """Every (beam, candidate) extension, best first: stop tokens finish, the best `width` others live."""
        spec = self.spec
        candidates = [
            (beam.cum_logprob + logprob, b, rank, token_id)
            for b, (beam, record) in enumerate(zip(live, records, strict=True))
            for rank, (token_id, logprob) in enumerate(record.top, start=1)
        ]
        candidates.sort(key=lambda c: -c[0])  # stable: ties keep beam order, then rank order
        next_live: list[Beam] = []
        finished: list[Beam] = []
        for cum, b, rank, token_id in candidates:
            beam, record = live[b], records[b]
            if token_id in self._stop_ids and len(beam.token_ids) < spec.sampling.min_tokens:
                continue  # banned until min_tokens, as the engine bans it
            if len(next_live) == spec.width and token_id not in self._stop_ids:
                continue
            grown = Beam(
                beam.token_ids + (token_id,),
                cum,
                beam.logprobs + (TokenLogprob(token_id, record.top[rank - 1][1], rank, record.top),),
            )
            if token_id in self._stop_ids:
                finished.append(self._finish(grown, "stop", None if self._is_eos(token_id) else token_id))
                continue
            text, stop_str = self._text(grown.token_ids, stop_token=False)
            if stop_str is not None:
                finished.append(replace(grown, finish_reason="stop", stop_reason=stop_str, text=text,
                                        num_scored=len(grown.token_ids)))  # fmt: skip
            elif len(grown.token_ids) >= spec.max_tokens:
                finished.append(self._finish(grown, "length", None))
            else:
                next_live.append(grown)
        return next_live, finished

    def _is_eos(self, token_id: int) -> bool:
        return token_id == self.engine.tokenizer.eos_token_id and not self.spec.sampling.ignore_eos

    def _finish(self, beam: Beam, reason: str, stop_reason: int | None) -> Beam:
        ended_by_token = reason == "stop"
        text, _ = self._text(beam.token_ids, stop_token=ended_by_token)
        num_scored = len(beam.token_ids) - (1 if ended_by_token else 0)
        return replace(beam, finish_reason=reason, stop_reason=stop_reason, text=text, num_scored=num_scored)

    def _text(self, token_ids: tuple[int, ...], stop_token: bool) -> tuple[str, str | None]:
        """The beam's text as the engine's client side would show it, and the stop string it hit."""
        params = self.spec.sampling
        if stop_token and not params.include_stop_str_in_output:
            token_ids = token_ids[:-1]  # the token that ended it is not shown (engine rule)
        detok = IncrementalDetokenizer(
            self.engine.tokenizer,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
        )
        delta = detok.update(token_ids)
        if delta.stop_str is None:
            detok.flush()
        return detok.output_text, delta.stop_str

    def _best(self, beams: list[Beam]) -> list[Beam]:
        ranked = sorted(beams, key=lambda beam: -score(beam, self.spec.length_penalty))
        return ranked[: self.spec.width]

    def _cannot_improve(self, live: list[Beam], done: list[Beam]) -> bool:
        """True once `width` beams are done and no live beam can reach the worst of them.

        A live beam's logprob can only fall; its score is highest at its longest (length_penalty
        > 0: max_tokens) or at its current length (length_penalty <= 0).
        """
        if len(done) < self.spec.width:
            return False
        lp = self.spec.length_penalty
        worst = score(done[-1], lp)
        for beam in live:
            length = self.spec.max_tokens if lp > 0 else max(len(beam.token_ids), 1)
            if beam.cum_logprob / (length**lp) >= worst:
                return False
        return True


def resolved_max_tokens(sampling: SamplingParams, num_prompt: int, max_model_len: int) -> int:
    room = max_model_len - num_prompt
    return room if sampling.max_tokens is None else min(sampling.max_tokens, room)


def beam_logprobs(width: int, top_logprobs: int) -> int:
    return max(2 * width, top_logprobs)
