"""One request's sampling row: what is fixed at admission, and the penalty counts that grow with it.

Owns `RowSampling`, built once when a request enters the core (from its `SamplingParams`, the EOS
id and the model's vocabulary size) and never changed after, and `PenaltyTracker`, the sparse view
of the tokens a request has seen. Building a row is where a request's values meet the tensors'
limits, so it is where a bad value fails (that request alone, see `core`): a non-finite float, a
top_k beyond what a tensor holds.

What building a row decides, so that the batched step never has to:
- token ids outside the vocabulary are dropped from logit_bias, allowed_token_ids, bad words
  and the min_tokens ban (such a token can never be sampled, so banning, biasing or allowing it
  changes nothing); serving rejects them with a 422 before they get here;
- a top_k of the vocabulary size or more is "off";
- temperature 0 is greedy; a greedy row's temperature is recorded as 1 (its token is the argmax).
Never touches logits and never samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loom.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class RowSampling:
    greedy: bool
    temperature: float  # > 0; 1.0 on greedy rows
    top_k: int | None  # None = off
    top_p: float  # 1.0 = off
    min_p: float  # 0.0 = off
    min_tokens: int
    min_tokens_ban: tuple[int, ...]  # EOS (unless ignore_eos) and stop token ids, banned below min_tokens
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    bias_ids: torch.Tensor | None  # [B] long, in-vocabulary ids of logit_bias
    bias_values: torch.Tensor | None  # [B] float32
    allowed_ids: torch.Tensor | None  # [A] long; None = every token allowed
    bad_words: tuple[tuple[int, ...], ...]  # words whose last token is inside the vocabulary
    logprobs: int | None  # top-k logprobs to report; None = none

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def constrains_tokens(self) -> bool:
        """Whether any token can be masked to -inf on this row (so a row may be left with none)."""
        return bool(self.min_tokens_ban) or self.allowed_ids is not None or bool(self.bad_words)


def build_row_sampling(params: SamplingParams, eos_token_id: int | None, vocab_size: int) -> RowSampling:
    """Raises ValueError for a value the batched tensors cannot hold or that would poison the row."""
    floats = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        **{f"logit_bias[{token}]": bias for token, bias in params.logit_bias},
    }
    for name, value in floats.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} is not finite")
    if params.repetition_penalty <= 0:
        raise ValueError("repetition_penalty must be > 0")

    def in_vocab(ids: Sequence[int]) -> list[int]:
        return [t for t in ids if 0 <= t < vocab_size]

    ban = set(in_vocab(params.stop_token_ids))
    if eos_token_id is not None and not params.ignore_eos and 0 <= eos_token_id < vocab_size:
        ban.add(eos_token_id)
    bias = {t: b for t, b in params.logit_bias if 0 <= t < vocab_size}
    allowed = None if params.allowed_token_ids is None else in_vocab(params.allowed_token_ids)
    greedy = params.temperature == 0
    return RowSampling(
        greedy=greedy,
        temperature=1.0 if greedy else params.temperature,
        top_k=params.top_k if params.top_k is not None and params.top_k < vocab_size else None,
        top_p=params.top_p,
        min_p=params.min_p,
        min_tokens=params.min_tokens,
        min_tokens_ban=tuple(sorted(ban)) if params.min_tokens > 0 else (),
        repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        bias_ids=torch.tensor(list(bias), dtype=torch.long) if bias else None,
        bias_values=torch.tensor(list(bias.values()), dtype=torch.float32) if bias else None,
        allowed_ids=None if allowed is None else torch.tensor(allowed, dtype=torch.long),
        bad_words=tuple(w for w in params.bad_words_ids if w and 0 <= w[-1] < vocab_size),
        logprobs=params.logprobs,
    )


class PenaltyTracker:
    """The distinct tokens of a request's prompt and output (first-seen order) and each one's output count.

    Brought up to date with the tokens appended since the last step, so a step costs O(new
    tokens), not O(vocabulary) or O(sequence); penalties then touch only these ids.
    """

    def __init__(self, prompt_ids: Sequence[int]) -> None:
        self._index: dict[int, int] = {}  # token id -> position in ids
        self.ids: list[int] = []
        self.counts: list[float] = []  # output occurrences; 0 for prompt-only tokens
        self._num_counted = 0  # output_ids[:_num_counted] are in counts
        for token in prompt_ids:
            if token not in self._index:
                self._index[token] = len(self.ids)
                self.ids.append(token)
                self.counts.append(0.0)

    def update(self, output_ids: Sequence[int]) -> None:
        for token in output_ids[self._num_counted :]:
            pos = self._index.get(token)
            if pos is None:
                self._index[token] = len(self.ids)
                self.ids.append(token)
                self.counts.append(1.0)
            else:
                self.counts[pos] += 1.0
        self._num_counted = len(output_ids)
