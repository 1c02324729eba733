"""Raw HTTP helpers for e2e tests that need fields or shapes the openai SDK does not expose."""

from __future__ import annotations

import json
from typing import Any

import httpx

MODEL = "SmolLM2-135M-Instruct"
TIMEOUT_S = 600


def post(base_url: str, prompt: str, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)


def complete(base_url: str, prompt: str, **fields: Any) -> dict[str, Any]:
    resp = post(base_url, prompt, **fields)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def stream(base_url: str, prompt: str, **fields: Any) -> list[dict[str, Any]]:
    """Every `data:` chunk of a streamed answer, `[DONE]` excluded."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True, **fields}
    chunks = []
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks
