"""The engine core: one `step()` = schedule -> run the model -> grammar masks -> sample -> grammars accept -> update.

Owns the scheduler, runner and sampler of one model. Runs on its own thread (see
`async_engine`); everything here is synchronous and token-ids only.

Containment: work done for one request that raises ends that request alone, with finish_reason
"error" (status FINISHED_ERROR), and the step goes on for the others:
- admission: prompt ids outside the vocabulary, a sampling value no tensor can hold
  (`admit_sampling`), a grammar that cannot start;
- a step: filling its grammar's bitmask, preparing its sampling row, its grammar refusing the
  sampled token, a row its masks left with no token;
- sampling: when the batched sample raises, each row is sampled alone (same draws, same
  tokens), and the rows that raise alone fail.
A failed model forward fails the requests of that step (their KV cache may be half written).
The traceback is logged here; the request's output says only that it failed.

Fast-forward (`fast_forward`, on by default): after a grammar accepts the sampled token, the
tokens it forces next (fixed keys, punctuation, the rest of the one remaining choice) are accepted
and appended too, so the next step computes them as one chunk, the way a prompt is, and samples
after the last one: k forced tokens cost one forward pass instead of k. Forced tokens stop before
an EOS or stop token id and within max_tokens and the context; requests that report logprobs
are not fast-forwarded (a forced token has no distribution of its own until it is computed).

Logprobs ride along: the sampler returns one `TokenLogprob` per row that asked, `update` puts it
on that request's `CoreOutput`; prompt logprobs are collected by the runner on the `Request` and
leave with its first `CoreOutput`.
"""

from __future__ import annotations

import logging
import sys

import torch

from loom.engine.logprobs import TokenLogprob
from loom.engine.request import EngineRequest, Request, RequestStatus
from loom.engine.runner import ModelRunner
from loom.engine.sampler import Sampler
from loom.engine.sampling_batch import RowInputs, SamplingBatch, admit_sampling, draw_uniforms, row_input
from loom.engine.scheduler import CoreOutput, Scheduler

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self, scheduler: Scheduler, runner: ModelRunner, eos_token_id: int | None, fast_forward: bool = True
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.sampler = Sampler()
        self.eos_token_id = eos_token_id
        self.vocab_size = runner.model.config.vocab_size
        self.fast_forward = fast_forward
        self.num_forced_tokens = 0  # appended by fast-forward since start, for metrics and the benchmark
        self._failed: list[CoreOutput] = []  # requests failed since the last step returned

    @property
    def has_work(self) -> bool:
        return bool(self._failed) or self.scheduler.has_work

    def add_request(self, submitted: EngineRequest) -> None:
        req = Request(submitted, self.eos_token_id)
        try:
            if any(not 0 <= t < self.vocab_size for t in req.prompt_ids):
                raise ValueError("prompt token ids outside the vocabulary")
            admit_sampling(req, self.vocab_size)
            if req.params.grammar is not None:
                req.grammar = req.params.grammar.new_grammar()
        except Exception:
            self._fail(req, "admitting it")
            return
        self.scheduler.add(req)

    def abort_request(self, req_id: str) -> None:
        self.scheduler.abort(req_id)

    @torch.inference_mode()
    def step(self) -> list[CoreOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return self._take_failed()
        try:
            logits, reqs = self.runner.execute(sched)
        except Exception:
            for req, _ in sched.scheduled:
                self._fail(req, "running the model")
            return self._take_failed()
        masks = self._grammar_masks(reqs)
        sampled, logprobs = self._sample(logits, reqs, masks)
        complete, forced = self._advance_grammars(reqs, sampled)
        outputs = self.scheduler.update(sched, sampled, logprobs, complete, forced)
        return self._take_failed() + outputs

    def _grammar_masks(self, reqs: list[Request]) -> list[torch.Tensor | None]:
        """Each request's allowed next tokens as a bitmask row (None without a grammar)."""
        masks: list[torch.Tensor | None] = [None] * len(reqs)
        for i, req in enumerate(reqs):
            if req.grammar is None:
                continue
            try:
                bitmask = torch.zeros((1, req.grammar.bitmask_words), dtype=torch.int32)
                req.grammar.fill_bitmask(bitmask, 0)
                masks[i] = bitmask[0]
            except Exception:
                self._fail(req, "filling its grammar's bitmask")
        return masks

    def _sample(
        self, logits: torch.Tensor, reqs: list[Request], masks: list[torch.Tensor | None]
    ) -> tuple[dict[str, int], dict[str, TokenLogprob]]:
        """The batched sample; if it raises, each row alone, so that only the rows that raise fail."""
        uniforms = draw_uniforms(reqs)
        rows: list[int] = []
        inputs: list[RowInputs] = []
        for i, req in enumerate(reqs):
            if req.status.finished:
                continue
            try:
                inputs.append(row_input(req, masks[i], uniforms[i]))
                rows.append(i)
            except Exception:
                self._fail(req, "preparing its sampling row")
        live = logits if len(rows) == len(reqs) else logits[rows]
        try:
            out = self.sampler.sample(live, SamplingBatch.build(inputs))
            results = list(zip(out.token_ids, out.logprobs or [None] * len(rows), strict=True))
        except Exception:
            log.exception("batched sampling failed: sampling each of its %d rows alone", len(rows))
            results = [self._sample_alone(live[n : n + 1], inputs[n], reqs[i]) for n, i in enumerate(rows)]
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        for i, (token, record) in zip(rows, results, strict=True):
            req = reqs[i]
            if token is None:
                if not req.status.finished:
                    self._fail(req, "sampling (its masks leave no token)")
                continue
            sampled[req.req_id] = token
            if record is not None:
                logprobs[req.req_id] = record
        return sampled, logprobs

    def _sample_alone(
        self, logits: torch.Tensor, inputs: RowInputs, req: Request
    ) -> tuple[int | None, TokenLogprob | None]:
        try:
            out = self.sampler.sample(logits, SamplingBatch.build([inputs]))
            return out.token_ids[0], (out.logprobs or [None])[0]
        except Exception:
            self._fail(req, "sampling")
            return None, None

    def _advance_grammars(
        self, reqs: list[Request], sampled: dict[str, int]
    ) -> tuple[frozenset[str], dict[str, tuple[int, ...]]]:
        """Each grammar accepts its request's token, then the tokens it forces (fast-forward).

        Returns the requests whose grammar is now complete, and each request's forced tokens."""
        complete: set[str] = set()
        forced: dict[str, tuple[int, ...]] = {}
        for req in reqs:
            token = sampled.get(req.req_id)
            if req.grammar is None or token is None or req.status.finished:
                continue
            try:
                if not req.grammar.accept_tokens([token]):
                    raise ValueError(f"the grammar refused the sampled token {token}")
                extra = self._forced_tokens(req, token)
                if extra:
                    if not req.grammar.accept_tokens(list(extra)):
                        raise ValueError("the grammar refused the tokens it forced")
                    forced[req.req_id] = extra
                    self.num_forced_tokens += len(extra)
                if req.grammar.is_terminated():
                    complete.add(req.req_id)
            except Exception:
                self._fail(req, "advancing its grammar")
        return frozenset(complete), forced

    def _forced_tokens(self, req: Request, token: int) -> tuple[int, ...]:
        """What fast-forward appends after `token`: the grammar's forced tokens, cut to the room left
        (max_tokens, the context) and before any EOS or stop token id (those end requests when
        sampled). None for requests that report logprobs: forced tokens have no distribution yet."""
        assert req.grammar is not None
        if not self.fast_forward or req.params.logprobs is not None or req.grammar.is_terminated():
            return ()
        if token == req.eos_token_id or token in req.params.stop_token_ids:
            return ()
        room = self.scheduler.config.max_model_len - req.num_tokens - 1  # the token itself is appended too
        if req.params.max_tokens is not None:
            room = min(room, req.params.max_tokens - len(req.output_ids) - 1)
        extra: list[int] = []
        for t in req.grammar.forced_tokens()[: max(room, 0)]:
            if t == req.eos_token_id or t in req.params.stop_token_ids:
                break
            extra.append(t)
        return tuple(extra)

    def _fail(self, req: Request, doing: str) -> None:
        """Ends `req` alone with finish_reason "error"; logs why (with the traceback when there is one)."""
        log.error("request %s failed while %s", req.req_id, doing, exc_info=sys.exc_info()[1] is not None)
        self.scheduler.abort(req.req_id, RequestStatus.FINISHED_ERROR)
        req.status = RequestStatus.FINISHED_ERROR  # also when it never reached the scheduler
        self._failed.append(CoreOutput(req.req_id, (), "error", None, req.num_prompt_tokens))

    def _take_failed(self) -> list[CoreOutput]:
        failed, self._failed = self._failed, []
        return failed
