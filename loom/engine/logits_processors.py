"""Grammar masks, bans, penalties, biases and allowed tokens applied, in place, to a batch of logits.

Owns the semantics of the penalty and mask fields of `SamplingParams` and of the grammar bitmask,
as tensor work over a prepared `SamplingBatch` (never a `Request`, never a Python loop over rows
or the vocabulary). Never samples, never computes logprobs (those come from the raw logits, see
`sampler`). Each step is skipped when no row needs it.

Order of operations:
  1. grammar bitmask: every token the row's grammar does not allow next is set to -inf
     (`grammar.apply_grammar_bitmask`).
  2. min_tokens: EOS (unless ignore_eos) and the stop token ids are set to -inf while the row
     has fewer than min_tokens output tokens.
  3. repetition_penalty (vLLM / Hugging Face): for every token present in the prompt or the
     output, a positive logit is divided by the penalty, a negative one multiplied by it.
  4. frequency_penalty and presence_penalty (OpenAI): over generated tokens only, subtract
     `frequency_penalty * count + presence_penalty * (count > 0)`.
  5. logit_bias: add the bias to its token, after the penalties so that +100 all but forces and
     -100 all but bans whatever the penalties did.
  6. allowed_token_ids: every other token is set to -inf.
  7. bad_words_ids: a word's last token is set to -inf when the output ends with the word's
     preceding tokens (a single-token word is always banned); only output tokens are matched.
-inf is absorbing: a penalty multiplies or subtracts, a bias adds a finite number, so a token
masked by 1, 2, 6 or 7 stays masked; +100 of logit_bias cannot revive a token the grammar,
min_tokens, allowed_token_ids or a bad word removed. Hence the -inf steps commute with each
other and with 3-5, and 2 and 7 run as one scatter (`batch.banned`) before the penalties.

Penalties 3 and 4 touch only the tokens a request has seen (`PenaltyTracker`): the logits at
those ids are gathered, penalized and scattered back, a few hundred values per row instead of
passes over the whole vocabulary.
"""

from __future__ import annotations

import torch

from loom.engine.grammar import apply_grammar_bitmask
from loom.engine.sampling_batch import SamplingBatch

_NEG_INF = float("-inf")


def apply_logits_processors(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Applies, in place, every mask / penalty / bias of `batch`; `logits` is `[R, vocab]`."""
    if batch.grammar_rows is not None and batch.grammar_bitmask is not None:
        apply_grammar_bitmask(logits, batch.grammar_rows, batch.grammar_bitmask)
    if batch.banned is not None:
        logits[batch.banned.rows, batch.banned.cols] = _NEG_INF
    if batch.penalties is not None:
        _apply_penalties(logits, batch)
    bias = batch.bias
    if bias is not None and bias.values is not None:
        logits.index_put_((bias.rows, bias.cols), bias.values.to(logits.dtype), accumulate=True)
    if batch.allowed is not None:
        _apply_allowed(logits, batch)


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    p = batch.penalties
    assert p is not None
    values = logits[p.rows, p.cols]
    values = torch.where(values > 0, values / p.repetition, values * p.repetition)
    values = values - p.frequency * p.counts - p.presence * (p.counts > 0).to(logits.dtype)
    logits[p.rows, p.cols] = values


def _apply_allowed(logits: torch.Tensor, batch: SamplingBatch) -> None:
    allowed = batch.allowed
    assert allowed is not None
    banned = torch.zeros(logits.shape, dtype=torch.bool)  # [R, vocab]
    banned[allowed.rows] = True
    banned[allowed.entry_rows, allowed.cols] = False
    logits.masked_fill_(banned, _NEG_INF)
