"""Batched sampler: one token per row of logits, every parameter a tensor op over the batch.

Order of operations (each step skipped when no row in the batch needs it):
  0. logprobs: rows whose params ask for them take `log_softmax` of the raw logits first
  1. min_tokens: EOS and stop token ids are banned for rows below their min_tokens; then the
     penalties, biases and masks of `logits_processors` (in place, order written there)
  2. greedy rows take the argmax of the (masked) logits
  3. temperature scaling (greedy rows divided by 1, their result is already fixed)
  4. top_k, then top_p, over one descending sort of the logits
  5. min_p: tokens whose probability is below min_p * max probability are dropped
  6. a draw per row by the exponential race `argmax(p / q), q ~ Exp(1)`; rows with a seed draw
     q from their own generator, so a seeded request samples the same whether alone or batched.
  7. logprobs: the sampled token's logprob and rank, and the top k, gathered from step 0.

Logprobs (sampled and prompt alike) come from the RAW model distribution: the softmax of the
model's logits before min_tokens, penalties, logit_bias, allowed / bad words, temperature and
top-k / top-p / min-p (vLLM's default, "raw_logprobs"). So they are defined for greedy rows too,
do not depend on temperature, and a sampled token's rank can exceed 1 when a processor or a
filter moved the choice (a +100 logit_bias forces a token but reports its model logprob).

Never decides stop conditions (the scheduler does) and never touches text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loom.engine.logits_processors import apply_logits_processors
from loom.engine.logprobs import TokenLogprob
from loom.engine.request import Request

_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    # row r's record when reqs[r].params.logprobs is set (else None); None altogether when no row asked
    logprobs: list[TokenLogprob | None] | None = None


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprob]:
    """Per row of `logprobs` `[N, vocab]`: token_ids[n]'s logprob, its rank and the num_top[n] best."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    ranks = ((logprobs > chosen).sum(dim=1) + 1).tolist()
    k = min(max(num_top, default=0), logprobs.shape[1])
    top_ids: list[list[int]] = [[] for _ in num_top]
    top_values: list[list[float]] = [[] for _ in num_top]
    if k > 0:
        values, ids = logprobs.topk(k, dim=1)  # [N, k], best first
        top_ids, top_values = ids.tolist(), values.tolist()
    return [
        TokenLogprob(tid, lp, rank, tuple(zip(ids_n[:kn], vals_n[:kn], strict=True)))
        for tid, lp, rank, ids_n, vals_n, kn in zip(
            token_ids.tolist(), chosen.squeeze(1).tolist(), ranks, top_ids, top_values, num_top, strict=True
        )
    ]


class Sampler:
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> SamplerOutput:
        """`logits` is `[R, vocab]` float32 (modified in place), row r belonging to `reqs[r]`."""
        if not reqs:
            return SamplerOutput([])
        rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if not rows:
            return SamplerOutput(self._choose(logits, reqs).tolist())
        raw = logits.log_softmax(dim=-1) if len(rows) == len(reqs) else logits[rows].log_softmax(dim=-1)
        sampled = self._choose(logits, reqs)
        records = token_logprobs(raw, sampled[rows], [reqs[i].params.logprobs or 0 for i in rows])
        logprobs: list[TokenLogprob | None] = [None] * len(reqs)
        for i, record in zip(rows, records, strict=True):
            logprobs[i] = record
        return SamplerOutput(sampled.tolist(), logprobs)

    def _choose(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Steps 1-6: one token id per row, `[R]`."""
        self._apply_min_tokens(logits, reqs)
        apply_logits_processors(logits, reqs)
        greedy = torch.tensor([r.params.greedy for r in reqs])
        if bool(greedy.all()):
            return logits.argmax(dim=-1)
        temps = torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in reqs])
        logits = logits / temps.unsqueeze(1)
        logits = self._apply_top_k_top_p(logits, reqs)
        probs = logits.softmax(dim=-1)
        probs = self._apply_min_p(probs, reqs)
        sampled = self._draw(probs, reqs)
        if bool(greedy.any()):
            sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
        return sampled

    @staticmethod
    def _apply_min_tokens(logits: torch.Tensor, reqs: list[Request]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, r in enumerate(reqs):
            if len(r.output_ids) >= r.params.min_tokens:
                continue
            banned = set(r.params.stop_token_ids)
            if r.eos_token_id is not None and not r.params.ignore_eos:
                banned.add(r.eos_token_id)
            rows.extend([i] * len(banned))
            cols.extend(banned)
        if rows:
            logits[rows, cols] = _NEG_INF

    @staticmethod
    def _apply_top_k_top_p(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        top_k = [r.params.top_k for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        if all(k is None for k in top_k) and all(p >= 1.0 for p in top_p):
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ranks = torch.arange(vocab).unsqueeze(0)
        k = torch.tensor([kk if kk is not None else vocab for kk in top_k]).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, _NEG_INF)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= torch.tensor(top_p).unsqueeze(1), _NEG_INF)
        return torch.full_like(logits, _NEG_INF).scatter_(-1, order, sorted_logits)

    @staticmethod
    def _apply_min_p(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        min_p = [r.params.min_p for r in reqs]
        if not any(min_p):
            return probs
        threshold = torch.tensor(min_p).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        return probs.masked_fill(probs < threshold, 0.0)

    @staticmethod
    def _draw(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        q = torch.empty_like(probs).exponential_()
        for i, r in enumerate(reqs):
            if r.generator is not None:
                q[i].exponential_(generator=r.generator)
        return (probs / q).argmax(dim=-1)
