"""The seeded request set: what every target is asked, identical across targets and runs.

Owns the workload settings (prompt and output lengths with an optional jitter, temperature, top_p,
`ignore_eos`, the seed), the prompts (each unique from its first words, so no prefix cache serves
one request's prompt to another; cut to a token count with the model's tokenizer when one is at
hand), the chat request bodies and the Poisson arrival times of `--request-rate`. Request `i`
depends only on the seed and `i`, never on how many requests are drawn or in which order. Never
sends anything.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

_WORDS = (
    "river town bread harbour market lantern boat gull spice quay dawn noon evening voice cart baker oven "
    "net tide sail rope anchor shell salt wind storm light bridge stone road garden orchard apple winter "
    "summer letter window candle mountain valley forest meadow fox owl kettle clock mirror ladder violin "
    "painter sailor farmer teacher doctor engine railway station ticket journey island lighthouse compass "
    "map story song festival harvest village castle tower library museum chapter question answer reason"
).split()
_WORDS_PER_TOKEN = 0.75  # English prose, only used without a tokenizer (a remote target's model)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    prompt_tokens: int = 128  # the user message, before the chat template adds its own tokens
    max_tokens: int = 128
    length_jitter: float = 0.0  # 0.25: each length drawn uniformly from [0.75 n, 1.25 n]
    temperature: float = 0.8
    top_p: float | None = None
    ignore_eos: bool = True  # sent where the target honors it, so every request runs max_tokens
    seed: int = 0
    request_seeds: bool = True  # each request carries `seed`; off for a target that fails on it


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    prompt: str
    max_tokens: int


def _jittered(rng: random.Random, n: int, jitter: float) -> int:
    if jitter <= 0:
        return n
    return max(1, round(rng.uniform(n * (1 - jitter), n * (1 + jitter))))


def prompt_text(index: int, num_tokens: int, rng: random.Random, tokenizer: Tokenizer | None) -> str:
    """About `num_tokens` tokens of seeded prose, unique from its first word on."""
    words = [f"Request {index}:"] + [rng.choice(_WORDS) for _ in range(num_tokens * 2)]
    text = " ".join(words)
    if tokenizer is None:
        return " ".join(words[: max(2, round(num_tokens * _WORDS_PER_TOKEN))])
    ids = tokenizer.encode(text, add_special_tokens=False)[:num_tokens]
    return str(tokenizer.decode(ids)).strip()


def build_request(spec: WorkloadSpec, index: int, tokenizer: Tokenizer | None = None) -> BenchRequest:
    rng = random.Random(f"{spec.seed}:{index}")  # request i alone decides its draws
    num_prompt = _jittered(rng, spec.prompt_tokens, spec.length_jitter)
    max_tokens = _jittered(rng, spec.max_tokens, spec.length_jitter)
    return BenchRequest(index, prompt_text(index, num_prompt, rng, tokenizer), max_tokens)


def build_requests(
    spec: WorkloadSpec, count: int, first_index: int = 0, tokenizer: Tokenizer | None = None
) -> list[BenchRequest]:
    """`first_index` numbers the prompts: phases that must not share cached prompts use disjoint ranges."""
    return [build_request(spec, i, tokenizer) for i in range(first_index, first_index + count)]


def chat_body(model_id: str, request: BenchRequest, spec: WorkloadSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "user", "content": request.prompt}],
        "max_tokens": request.max_tokens,
        "temperature": spec.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if spec.request_seeds:
        body["seed"] = spec.seed + request.index  # the same sampled output on every run of a target
    if spec.top_p is not None:
        body["top_p"] = spec.top_p
    if spec.ignore_eos:
        body["ignore_eos"] = True
    return body


def arrival_offsets(count: int, rate: float | None, seed: int = 0) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of `rate` per
    second (exponential gaps), or all at once when `rate` is None."""
    if rate is None:
        return [0.0] * count
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    rng = random.Random(f"arrivals:{seed}")
    offsets, now = [], 0.0
    for _ in range(count):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets
