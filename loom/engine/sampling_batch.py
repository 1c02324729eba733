"""`SamplingBatch`: the prepared tensors one sampling step works on, built from the scheduled requests.

Owns the turn from requests to tensors. Per request, what never changes is built once at
admission (`admit_sampling`: its `RowSampling`, its penalty tracker); per step, `row_input`
reads what moved (output length against min_tokens, the bad words the output's tail completes,
new tokens for the penalty counts, the grammar's bitmask row, one uniform draw), and
`SamplingBatch.build` stacks the rows into per-row tensors, index lists and plain Python flags.
The sampler then does tensor work only and never sees a `Request`.

Rows are independent: `build` of a subset of the rows gives exactly those rows' tensors, so a
step whose batched sampling raised can sample each row alone (see `core`), and a row's draw is
fixed before that (`RowInputs.uniform`), so it samples the same token either way.

Draws: a row that samples (not greedy) takes one uniform number in [0, 1) per step, from its
own generator when it has a seed (so a seeded request samples the same alone or batched), else
from torch's global generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loom.engine.request import Request
from loom.engine.sampling_rows import PenaltyTracker, RowSampling, build_row_sampling


def admit_sampling(req: Request, vocab_size: int) -> None:
    """Builds the request's fixed sampling state; raises ValueError for values no row can hold."""
    req.sampling = build_row_sampling(req.params, req.eos_token_id, vocab_size)
    if req.sampling.has_penalties:
        req.penalties = PenaltyTracker(req.prompt_ids)


@dataclass(frozen=True, slots=True)
class RowInputs:
    """One row's share of a step: the fixed part plus what this step's state adds."""

    row: RowSampling
    below_min_tokens: bool
    banned_ids: tuple[int, ...]  # the last tokens of bad words whose other tokens the output just produced
    seen_ids: torch.Tensor | None  # [S] long, penalties: distinct prompt and output tokens
    seen_counts: torch.Tensor | None  # [S] float32, their output counts
    uniform: float  # the row's draw in [0, 1); unused by greedy rows
    grammar_mask: torch.Tensor | None  # [words] int32, the grammar's allowed tokens; None = no grammar


def draw_uniforms(reqs: Sequence[Request]) -> list[float]:
    """Each request's draw for this step: seeded ones from their own generator, the others from
    one call on the global generator; greedy requests draw nothing (0.0)."""
    sampled = [r for r in reqs if r.sampling is not None and not r.sampling.greedy]
    unseeded = iter(torch.rand(sum(1 for r in sampled if r.generator is None)).tolist())
    uniforms = []
    for req in reqs:
        if req.sampling is None or req.sampling.greedy:
            uniforms.append(0.0)
        elif req.generator is None:
            uniforms.append(next(unseeded))
        else:
            uniforms.append(float(torch.rand(1, generator=req.generator)))
    return uniforms


def row_input(req: Request, grammar_mask: torch.Tensor | None, uniform: float) -> RowInputs:
    """This step's inputs of one request; brings its penalty counts up to date."""
    row = req.sampling
    if row is None:
        raise RuntimeError(f"request {req.req_id} was not admitted for sampling")
    seen_ids = seen_counts = None
    if req.penalties is not None:
        req.penalties.update(req.output_ids)
        seen_ids = torch.tensor(req.penalties.ids, dtype=torch.long)
        seen_counts = torch.tensor(req.penalties.counts, dtype=torch.float32)
    banned = _bad_word_bans(row, req.output_ids)
    below_min = len(req.output_ids) < row.min_tokens
    return RowInputs(row, below_min, banned, seen_ids, seen_counts, uniform, grammar_mask)


def _bad_word_bans(row: RowSampling, output_ids: list[int]) -> tuple[int, ...]:
    """A word's last token is banned when the output ends with the word's other tokens (only output is matched)."""
    banned = []
    for word in row.bad_words:
        prefix = len(word) - 1
        if prefix == 0 or (len(output_ids) >= prefix and tuple(output_ids[-prefix:]) == word[:-1]):
            banned.append(word[-1])
    return tuple(banned)


@dataclass(frozen=True, slots=True)
class TokenEdits:
    """Per-(row, token) entries: `values[i]` applies at `logits[rows[i], cols[i]]`."""

    rows: torch.Tensor  # [N] long
    cols: torch.Tensor  # [N] long
    values: torch.Tensor | None = None  # [N] float32


@dataclass(frozen=True, slots=True)
class Penalties:
    """Sparse: one entry per (row, seen token), each with its row's three penalties."""

    rows: torch.Tensor  # [N] long
    cols: torch.Tensor  # [N] long
    counts: torch.Tensor  # [N] output occurrences of the token
    repetition: torch.Tensor  # [N]
    frequency: torch.Tensor  # [N]
    presence: torch.Tensor  # [N]


@dataclass(frozen=True, slots=True)
class AllowedTokens:
    """Rows that allow only some tokens (`rows`), and those tokens as (entry_rows[i], cols[i]) pairs."""

    rows: torch.Tensor  # [M] long; a row whose list held no in-vocabulary id allows nothing
    entry_rows: torch.Tensor  # [N] long
    cols: torch.Tensor  # [N] long


@dataclass(frozen=True, slots=True)
class RowValues:
    """A filter's parameter on the rows that use it."""

    rows: torch.Tensor  # [M] long
    values: torch.Tensor  # [M]


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    num_rows: int
    all_greedy: bool
    greedy: torch.Tensor  # [R] bool
    temperature: torch.Tensor | None  # [R]; None when every row is greedy or at temperature 1
    uniform: torch.Tensor  # [R] each row's draw in [0, 1)
    top_k: RowValues | None  # long k < vocab
    top_p: RowValues | None  # p < 1
    min_p: torch.Tensor | None  # [R]; None when no row uses it
    banned: TokenEdits | None  # -inf: min_tokens' EOS / stop ids and completed bad words
    penalties: Penalties | None
    bias: TokenEdits | None  # logit_bias, added
    allowed: AllowedTokens | None
    grammar_rows: torch.Tensor | None  # [G] long, rows with a grammar
    grammar_bitmask: torch.Tensor | None  # [G, words] int32, bit t set = token t allowed
    may_mask_all: bool  # some row's masks could leave it no token at all
    logprob_rows: tuple[int, ...]  # rows that report logprobs
    num_top_logprobs: tuple[int, ...]  # per logprob row, how many top alternatives

    @staticmethod
    def build(inputs: Sequence[RowInputs]) -> SamplingBatch:
        rows = [i.row for i in inputs]
        greedy = [r.greedy for r in rows]
        temps = [r.temperature for r in rows]
        logprob_rows = tuple(n for n, r in enumerate(rows) if r.logprobs is not None)
        grammar_rows = [n for n, i in enumerate(inputs) if i.grammar_mask is not None]
        return SamplingBatch(
            num_rows=len(rows),
            all_greedy=all(greedy),
            greedy=torch.tensor(greedy, dtype=torch.bool),
            temperature=None if all(t == 1.0 for t in temps) else torch.tensor(temps, dtype=torch.float32),
            uniform=torch.tensor([i.uniform for i in inputs], dtype=torch.float32),
            top_k=_row_values([(n, r.top_k) for n, r in enumerate(rows) if r.top_k is not None], torch.long),
            top_p=_row_values([(n, r.top_p) for n, r in enumerate(rows) if r.top_p < 1.0], torch.float32),
            min_p=torch.tensor([r.min_p for r in rows]) if any(r.min_p > 0 for r in rows) else None,
            banned=_banned(inputs),
            penalties=_penalties(inputs),
            bias=_bias(rows),
            allowed=_allowed(rows),
            grammar_rows=torch.tensor(grammar_rows, dtype=torch.long) if grammar_rows else None,
            grammar_bitmask=_stacked_masks([inputs[n].grammar_mask for n in grammar_rows]),
            may_mask_all=bool(grammar_rows) or any(r.constrains_tokens for r in rows),
            logprob_rows=logprob_rows,
            num_top_logprobs=tuple(rows[n].logprobs or 0 for n in logprob_rows),
        )


def _row_values(pairs: list[tuple[int, float | int]], dtype: torch.dtype) -> RowValues | None:
    if not pairs:
        return None
    return RowValues(
        torch.tensor([n for n, _ in pairs], dtype=torch.long), torch.tensor([v for _, v in pairs], dtype=dtype)
    )


def _banned(inputs: Sequence[RowInputs]) -> TokenEdits | None:
    rows: list[int] = []
    cols: list[int] = []
    for n, i in enumerate(inputs):
        ids = (i.row.min_tokens_ban if i.below_min_tokens else ()) + i.banned_ids
        rows.extend([n] * len(ids))
        cols.extend(ids)
    return TokenEdits(torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)) if rows else None


def _penalties(inputs: Sequence[RowInputs]) -> Penalties | None:
    used = [(n, i) for n, i in enumerate(inputs) if i.seen_ids is not None and i.seen_counts is not None]
    if not used:
        return None
    lengths = torch.tensor([len(i.seen_ids) for _, i in used])  # type: ignore[arg-type]
    per_row = torch.tensor(
        [[i.row.repetition_penalty, i.row.frequency_penalty, i.row.presence_penalty] for _, i in used]
    )
    rep, freq, pres = per_row.repeat_interleave(lengths, dim=0).unbind(dim=1)
    return Penalties(
        rows=torch.tensor([n for n, _ in used]).repeat_interleave(lengths),
        cols=torch.cat([i.seen_ids for _, i in used]),  # type: ignore[misc]
        counts=torch.cat([i.seen_counts for _, i in used]),  # type: ignore[misc]
        repetition=rep,
        frequency=freq,
        presence=pres,
    )


def _bias(rows: Sequence[RowSampling]) -> TokenEdits | None:
    used = [(n, r) for n, r in enumerate(rows) if r.bias_ids is not None and r.bias_values is not None]
    if not used:
        return None
    lengths = torch.tensor([len(r.bias_ids) for _, r in used])  # type: ignore[arg-type]
    return TokenEdits(
        torch.tensor([n for n, _ in used]).repeat_interleave(lengths),
        torch.cat([r.bias_ids for _, r in used]),  # type: ignore[misc]
        torch.cat([r.bias_values for _, r in used]),  # type: ignore[misc]
    )


def _allowed(rows: Sequence[RowSampling]) -> AllowedTokens | None:
    used = [(n, r.allowed_ids) for n, r in enumerate(rows) if r.allowed_ids is not None]
    if not used:
        return None
    row_ids = torch.tensor([n for n, _ in used], dtype=torch.long)
    lengths = torch.tensor([len(ids) for _, ids in used])
    return AllowedTokens(row_ids, row_ids.repeat_interleave(lengths), torch.cat([ids for _, ids in used]))


def _stacked_masks(masks: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    width = max(m.shape[0] for m in present)  # backends may differ; a missing word allows nothing
    return torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[0])) for m in present])
