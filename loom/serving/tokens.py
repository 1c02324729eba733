"""`/tokenize` and `/detokenize` for serving: text or a chat to token ids, and back.

Owns the vocabulary check of ids sent to be decoded. Runs the tokenizer off the event loop.
Never submits to the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from loom.serving.chat_prompt import ParserConfig, render_chat_prompt
from loom.serving.templates import TemplateRenderer
from loom.serving.types import ChatRequest, InvalidRequest
from loom.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class Tokenized:
    token_ids: tuple[int, ...]
    token_strs: tuple[str, ...] | None


def _tokenized(tok: Tokenizer, ids: list[int], with_strs: bool) -> Tokenized:
    return Tokenized(tuple(ids), tuple(tok.id_to_token(i) for i in ids) if with_strs else None)


async def tokenize_text(tok: Tokenizer, text: str, add_special_tokens: bool, with_strs: bool) -> Tokenized:
    ids = await asyncio.to_thread(tok.encode, text, add_special_tokens)
    return _tokenized(tok, ids, with_strs)


async def tokenize_chat(
    tok: Tokenizer, req: ChatRequest, with_strs: bool, renderer: TemplateRenderer, parsers: ParserConfig
) -> Tokenized:
    """The prompt a chat request with these messages would run on."""
    text = await render_chat_prompt(req, tok, renderer, parsers)
    return await tokenize_text(tok, text, req.template.add_special_tokens, with_strs)


async def detokenize(tok: Tokenizer, ids: Sequence[int]) -> str:
    outside = sorted({i for i in ids if not 0 <= i < tok.vocab_size})
    if outside:
        raise InvalidRequest(
            f"tokens has ids outside the vocabulary (0..{tok.vocab_size - 1}): {outside[:5]}", "tokens", 422
        )
    return await asyncio.to_thread(tok.decode, list(ids))
