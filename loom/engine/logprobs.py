"""Log-probability records the engine reports per token (sampled or prompt).

Token ids only; the client side turns them into text and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token of its distribution
    top: tuple[tuple[int, float], ...]  # the k most likely (token_id, logprob), best first
