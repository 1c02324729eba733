"""Loom-only scenarios run beside the plain levels, against the same server in the same invocation.

- sampler load: 32 concurrent streams where every request uses presence/frequency/repetition
  penalties, logit_bias and logprobs with top_logprobs=5, reported as a ratio of the plain run at
  the same concurrency (the sampler's extra work should cost under 15%).
- prefix cache: time to first token of a request behind a ~1,000-token system prompt, cold (a new
  cache_salt, so nothing is cached) vs warm (the same salt again), as a ratio.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

import httpx

SAMPLER_FIELDS: dict[str, Any] = {
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "logit_bias": {"28": -5.0, "30": 2.0, "216": 1.0},
    "logprobs": True,
    "top_logprobs": 5,
}
SYSTEM_SENTENCE = "You are a careful assistant who answers questions about the history of the sea. "


@dataclass(frozen=True, slots=True)
class PrefixCacheResult:
    system_prompt_tokens: int
    cold_ttft_s: float
    warm_ttft_s: float
    cached_tokens: int

    @property
    def speedup(self) -> float:
        return self.cold_ttft_s / self.warm_ttft_s


def sampler_body(plain: dict[str, Any]) -> dict[str, Any]:
    return {**plain, **SAMPLER_FIELDS}


async def _first_token(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """TTFT of a 1-token blocking request, and its usage."""
    start = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]


async def prefix_cache_ttft(client: httpx.AsyncClient, model_id: str, repeats: int = 3) -> PrefixCacheResult:
    system = SYSTEM_SENTENCE * 64  # ~1,000 tokens
    colds, warms, cached, prompt_tokens = [], [], 0, 0
    for _ in range(repeats):
        body = {
            "model": model_id,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hello?"}],
            "max_tokens": 1,
            "cache_salt": uuid.uuid4().hex,  # a fresh salt: nothing of this prompt is cached yet
        }
        cold, usage = await _first_token(client, body)
        warm, warm_usage = await _first_token(client, body)
        colds.append(cold)
        warms.append(warm)
        prompt_tokens = usage["prompt_tokens"]
        cached = (warm_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return PrefixCacheResult(prompt_tokens, min(colds), min(warms), cached)
