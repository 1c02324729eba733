"""Raw HTTP helpers for e2e tests that need fields or shapes the openai SDK does not expose."""

from __future__ import annotations

import json
from typing import Any

import httpx

MODEL = "SmolLM2-135M-Instruct"
TIMEOUT_S = 600
Prompt = str | list[dict[str, Any]]  # one user message, or the whole message list


def body(prompt: Prompt, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {"model": MODEL, "messages": messages, **fields}


def post(base_url: str, prompt: Prompt, **fields: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body(prompt, **fields), timeout=TIMEOUT_S)


def complete(base_url: str, prompt: Prompt, **fields: Any) -> dict[str, Any]:
    resp = post(base_url, prompt, **fields)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def stream(base_url: str, prompt: Prompt, **fields: Any) -> list[dict[str, Any]]:
    """Every `data:` chunk of a streamed answer, `[DONE]` excluded."""
    chunks = []
    request = body(prompt, stream=True, **fields)
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=request, timeout=TIMEOUT_S) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks


def streamed_choices(chunks: list[dict[str, Any]], index: int = 0) -> list[dict[str, Any]]:
    return [c for chunk in chunks for c in chunk["choices"] if c["index"] == index]


def streamed_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    return "".join(c["delta"].get("content") or "" for c in streamed_choices(chunks, index))
