"""`SamplingOptions`: serving's own form of a request's sampling fields, and the one place that
builds the engine's `SamplingParams` from it.

The API converts wire fields into `SamplingOptions` (already range-checked); serving adds what
only it knows (bad words as token sequences, how many logprobs it needs, the compiled grammar,
the vocabulary size) in `engine_params`. Never touches HTTP or tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from loom.engine import SamplingParams
from loom.engine.grammar import CompiledGrammar
from loom.engine.sampling_params import RepetitionDetection


@dataclass(frozen=True, slots=True)
class Repetition:
    """End once the output's tail repeats a pattern of min..max tokens `min_count` times."""

    max_pattern_size: int
    min_pattern_size: int = 1
    min_count: int = 2


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    max_tokens: int | None = None  # None = until the context window is full
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None  # None = off
    min_p: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token_id, bias in -100..100)
    allowed_token_ids: tuple[int, ...] | None = None  # None = every token allowed
    repetition_detection: Repetition | None = None


def engine_params(
    options: SamplingOptions,
    *,
    vocab_size: int,
    bad_words_ids: tuple[tuple[int, ...], ...] = (),
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    grammar: CompiledGrammar | None = None,
) -> SamplingParams:
    """What the engine runs. A `top_k` at or past the vocabulary keeps every token: off."""
    o = options
    top_k = None if o.top_k is not None and o.top_k >= vocab_size else o.top_k
    repetition = o.repetition_detection
    return SamplingParams(
        max_tokens=o.max_tokens, temperature=o.temperature, top_p=o.top_p, top_k=top_k, min_p=o.min_p,
        seed=o.seed, min_tokens=o.min_tokens, stop=o.stop, stop_token_ids=o.stop_token_ids,
        ignore_eos=o.ignore_eos, include_stop_str_in_output=o.include_stop_str_in_output,
        skip_special_tokens=o.skip_special_tokens, spaces_between_special_tokens=o.spaces_between_special_tokens,
        presence_penalty=o.presence_penalty, frequency_penalty=o.frequency_penalty,
        repetition_penalty=o.repetition_penalty, logit_bias=o.logit_bias, allowed_token_ids=o.allowed_token_ids,
        bad_words_ids=bad_words_ids, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        repetition_detection=None if repetition is None else RepetitionDetection(
            repetition.max_pattern_size, repetition.min_pattern_size, repetition.min_count
        ),
        grammar=grammar,
    )  # fmt: skip
