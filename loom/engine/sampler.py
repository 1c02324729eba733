"""Batched sampler: one token per row of logits, every parameter a tensor op over the batch.

Order of operations (each step skipped when no row in the batch needs it):
  1. min_tokens: EOS and stop token ids are banned for rows below their min_tokens; then the
     penalties, biases and masks of `logits_processors` (in place)
  2. greedy rows take the argmax of the (masked) logits
  3. temperature scaling (greedy rows divided by 1, their result is already fixed)
  4. top_k, then top_p, over one descending sort of the logits
  5. min_p: tokens whose probability is below min_p * max probability are dropped
  6. a draw per row by the exponential race `argmax(p / q), q ~ Exp(1)`; rows with a seed draw
     q from their own generator, so a seeded request samples the same whether alone or batched.

Never decides stop conditions (the scheduler does) and never touches text.
"""

from __future__ import annotations

import torch

from loom.engine.logits_processors import apply_logits_processors
from loom.engine.request import Request

_NEG_INF = float("-inf")


class Sampler:
    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """`logits` is `[R, vocab]` float32, row r belonging to `reqs[r]`; returns one token id per row."""
        if not reqs:
            return []
        self._apply_min_tokens(logits, reqs)
        apply_logits_processors(logits, reqs)
        greedy = torch.tensor([r.params.greedy for r in reqs])
        if bool(greedy.all()):
            return logits.argmax(dim=-1).tolist()
        temps = torch.tensor([r.params.temperature if r.params.temperature > 0 else 1.0 for r in reqs])
        logits = logits / temps.unsqueeze(1)
        logits = self._apply_top_k_top_p(logits, reqs)
        probs = logits.softmax(dim=-1)
        probs = self._apply_min_p(probs, reqs)
        sampled = self._draw(probs, reqs)
        if bool(greedy.any()):
            sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)
        return sampled.tolist()

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
