"""`POST /tokenize` and `POST /detokenize`, as vLLM defines them.

`/tokenize` takes either `prompt` (text; `add_special_tokens` defaults to true) or `messages`
(rendered with the chat template like a chat request; `add_special_tokens` defaults to false)
and answers `{count, max_model_len, tokens, token_strs}`. `/detokenize` takes `tokens` and answers
`{prompt}`. Never generates.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field

from loom.api.common import as_api_error, check_model
from loom.api.config import ServerConfig
from loom.api.convert import chat_messages, template_options
from loom.api.errors import BadRequestError, UnprocessableEntityError
from loom.api.protocol_messages import ChatMessageParam, WireModel
from loom.api.protocol_response import random_id
from loom.api.strict_json import StrictJSONRoute
from loom.serving import tokens
from loom.serving.chat import ChatService
from loom.serving.sampling import SamplingOptions
from loom.serving.types import ChatRequest, InvalidRequest


class TokenizeRequest(WireModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]]


def tokens_router(chat: ChatService, config: ServerConfig) -> APIRouter:
    router = APIRouter(route_class=StrictJSONRoute)
    tok = chat.engine.tokenizer

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model, config)
        if (body.prompt is None) == (body.messages is None):
            raise BadRequestError("send exactly one of 'prompt' and 'messages'", param="prompt")
        try:
            if body.prompt is not None:
                special = True if body.add_special_tokens is None else body.add_special_tokens
                result = await tokens.tokenize_text(tok, body.prompt, special, body.return_token_strs)
            else:
                result = await tokens.tokenize_chat(
                    tok, _chat_request(body, config), body.return_token_strs, chat.renderer, chat.parsers
                )
        except InvalidRequest as exc:
            raise as_api_error(exc) from exc
        return {
            "count": len(result.token_ids),
            "max_model_len": chat.engine.max_model_len,
            "tokens": list(result.token_ids),
            "token_strs": None if result.token_strs is None else list(result.token_strs),
        }

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        check_model(body.model, config)
        try:
            return {"prompt": await tokens.detokenize(tok, body.tokens)}
        except InvalidRequest as exc:
            raise as_api_error(exc) from exc

    return router


def _chat_request(body: TokenizeRequest, config: ServerConfig) -> ChatRequest:
    messages = body.messages or []
    if len(messages) > config.limits.max_messages:
        raise UnprocessableEntityError(
            f"'messages' has {len(messages)} messages; this server accepts at most {config.limits.max_messages}",
            param="messages",
        )
    if body.continue_final_message and body.add_generation_prompt:
        raise UnprocessableEntityError(
            "continue_final_message cannot be used with add_generation_prompt=true", param="continue_final_message"
        )
    return ChatRequest(
        request_id=random_id("tokenize"),
        messages=chat_messages(messages),
        sampling=SamplingOptions(),
        template=template_options(
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            add_special_tokens=bool(body.add_special_tokens),
            chat_template=body.chat_template,
            chat_template_kwargs=body.chat_template_kwargs,
        ),
    )
