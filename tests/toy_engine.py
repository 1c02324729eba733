"""A toy tokenizer and engine for serving tests: no model, deterministic logprobs.

Vocabulary: "a" "b" "c" "." and EOS (id 4). The "model" gives every context a fixed, made-up
distribution, so a search over it can be checked against brute force.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence

from loom.engine import EngineStats, RequestOutput, SamplingParams
from loom.engine.logprobs import TokenLogprob

PIECES = ["a", "b", "c", ".", "</s>"]
EOS = 4


class ToyTokenizer:
    eos_token_id: int | None = EOS
    bos_token: str | None = None
    eos_token: str | None = "</s>"
    vocab_size = len(PIECES)
    all_special_ids = frozenset({EOS})
    chat_template: str | None = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [PIECES.index(ch) if ch in PIECES else 0 for ch in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == EOS))

    def id_to_token(self, token_id: int) -> str:
        return PIECES[token_id]


def toy_logprobs(context: Sequence[int]) -> list[tuple[int, float]]:
    """The toy model's distribution after `context`, best first (ties by token id)."""
    h = sum((i + 1) * (t + 1) for i, t in enumerate(context)) % 97
    logits = [((h * (k + 3)) % 11) / 3.0 for k in range(len(PIECES))]
    norm = math.log(sum(math.exp(x) for x in logits))
    return sorted(((k, x - norm) for k, x in enumerate(logits)), key=lambda pair: (-pair[1], pair[0]))


class ToyEngine:
    """Answers every request with one greedy token and its logprobs (enough for beam steps)."""

    def __init__(self, max_model_len: int = 64, scheduling_policy: str = "fcfs") -> None:
        self.tokenizer = ToyTokenizer()
        self.max_model_len = max_model_len
        self.scheduling_policy = scheduling_policy
        self.requests: list[tuple[str, tuple[int, ...], SamplingParams]] = []
        self.is_running = False

    # the lifecycle `create_app` drives
    def start(self) -> None:
        self.is_running = True

    def shutdown(self) -> None:
        self.is_running = False

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0.0, 0, 0, 0)

    async def generate(
        self,
        req_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.requests.append((req_id, tuple(prompt_ids), params))
        ranked = toy_logprobs(prompt_ids)
        token_id, logprob = ranked[0]
        record = TokenLogprob(token_id, logprob, 1, tuple(ranked[: params.logprobs or 0]))
        yield RequestOutput(
            req_id, (token_id,), self.tokenizer.decode([token_id], True), True, "length", None,
            len(prompt_ids), 1, (record,), None, 0,
        )  # fmt: skip
