"""Penalties, biases and token masks applied, in place, to a batch of logits before sampling.

Owns the semantics of the penalty and mask fields of `SamplingParams`; never samples, never
computes logprobs (those come from the raw logits, see `sampler`). Each step is one batched
tensor op over the rows that need it, skipped when no row does; per request only small index
lists are built (never a Python loop over the vocabulary).

Order of operations (the sampler bans EOS / stop ids for min_tokens before all of these, and a
-inf stays -inf through every step):
  1. repetition_penalty (vLLM / Hugging Face): for every token present in the prompt or the
     output, a positive logit is divided by the penalty, a negative one multiplied by it.
  2. frequency_penalty and presence_penalty (OpenAI): over generated tokens only, subtract
     `frequency_penalty * count + presence_penalty * (count > 0)`.
  3. logit_bias: add the bias to its token, after the penalties so that +100 all but forces and
     -100 all but bans whatever the penalties did.
  4. allowed_token_ids: every other token is set to -inf.
  5. bad_words_ids: a word's last token is set to -inf when the output ends with the word's
     preceding tokens (a single-token word is always banned); only output tokens are matched.

Penalties 1 and 2 touch only the tokens a request has seen: their ids and output counts live on
the `Request` (`seen_ids`, `seen_counts`), built on first use and updated with the tokens appended
since the last step; the logits at those ids are gathered, penalized and scattered back. On a CPU
that is a few hundred values per row instead of passes over the whole vocabulary. Token ids outside the logits'
vocabulary are rejected by serving (422); any that reach here are ignored rather than failing
the whole batch's step.
"""

from __future__ import annotations

import torch

from loom.engine.request import Request

_NEG_INF = float("-inf")


def apply_logits_processors(logits: torch.Tensor, reqs: list[Request]) -> None:
    """Applies, in place, every penalty / bias / mask the requests ask for; `logits` is `[R, vocab]`, row r = reqs[r]."""
    penalized = [i for i, r in enumerate(reqs) if _has_penalties(r)]
    if penalized:
        _apply_penalties(logits, [reqs[i] for i in penalized], penalized)
    if any(r.params.logit_bias for r in reqs):
        _apply_logit_bias(logits, reqs)
    if any(r.params.allowed_token_ids is not None for r in reqs):
        _apply_allowed_token_ids(logits, reqs)
    if any(r.params.bad_words_ids for r in reqs):
        _apply_bad_words(logits, reqs)


def _has_penalties(req: Request) -> bool:
    p = req.params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _apply_penalties(logits: torch.Tensor, reqs: list[Request], rows: list[int]) -> None:
    """Sparse: only the tokens a request has seen (prompt or output) are read and written back."""
    seen = [_seen_tokens(r) for r in reqs]
    lengths = torch.tensor([len(ids) for ids, _ in seen])
    row_idx = torch.tensor(rows).repeat_interleave(lengths)  # [N]
    cols = torch.tensor([t for ids, _ in seen for t in ids])
    counts = torch.tensor([c for _, cs in seen for c in cs], dtype=logits.dtype)  # output counts, 0 for prompt-only
    per_row = torch.tensor([[r.params.repetition_penalty, r.params.frequency_penalty, r.params.presence_penalty] for r in reqs])
    rep, freq, pres = per_row.repeat_interleave(lengths, dim=0).unbind(dim=1)  # each [N]
    values = logits[row_idx, cols]
    values = torch.where(values > 0, values / rep, values * rep)
    values = values - freq * counts - pres * (counts > 0).to(logits.dtype)
    logits[row_idx, cols] = values


def _seen_tokens(req: Request) -> tuple[list[int], list[float]]:
    """The distinct tokens of prompt and output (first-seen order) and each one's output count.

    Kept on the request and brought up to date with the tokens appended since the last step, so
    a step costs O(new tokens), not O(vocabulary) or O(sequence).
    """
    if req.seen_index is None:
        req.seen_index = {}
        for token in req.prompt_ids:
            if token not in req.seen_index:
                req.seen_index[token] = len(req.seen_ids)
                req.seen_ids.append(token)
                req.seen_counts.append(0.0)
    for token in req.output_ids[req.num_counted_outputs :]:
        pos = req.seen_index.get(token)
        if pos is None:
            req.seen_index[token] = len(req.seen_ids)
            req.seen_ids.append(token)
            req.seen_counts.append(1.0)
        else:
            req.seen_counts[pos] += 1.0
    req.num_counted_outputs = len(req.output_ids)
    return req.seen_ids, req.seen_counts


def _apply_logit_bias(logits: torch.Tensor, reqs: list[Request]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    biases: list[float] = []
    vocab = logits.shape[1]
    for i, r in enumerate(reqs):
        for token_id, bias in r.params.logit_bias:
            if not 0 <= token_id < vocab:
                continue
            rows.append(i)
            cols.append(token_id)
            biases.append(bias)
    index = (torch.tensor(rows), torch.tensor(cols))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype), accumulate=True)


def _apply_allowed_token_ids(logits: torch.Tensor, reqs: list[Request]) -> None:
    banned = torch.zeros(logits.shape, dtype=torch.bool)  # [R, vocab]
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(reqs):
        allowed = r.params.allowed_token_ids
        if allowed is None:
            continue
        banned[i] = True
        ids = [t for t in allowed if 0 <= t < logits.shape[1]]
        rows.extend([i] * len(ids))
        cols.extend(ids)
    if rows:
        banned[rows, cols] = False
    logits.masked_fill_(banned, _NEG_INF)


def _apply_bad_words(logits: torch.Tensor, reqs: list[Request]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(reqs):
        output = r.output_ids
        for word in r.params.bad_words_ids:
            prefix = len(word) - 1
            if prefix < 0 or not 0 <= word[-1] < logits.shape[1]:
                continue
            if prefix == 0 or (len(output) >= prefix and tuple(output[-prefix:]) == tuple(word[:-1])):
                rows.append(i)
                cols.append(word[-1])
    if rows:
        logits[rows, cols] = _NEG_INF
