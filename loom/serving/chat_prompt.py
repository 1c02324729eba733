"""What a chat template is given to render, and how the answer will be read back.

Owns the steps between a `ChatRequest` and the template, for what templates differ on:
- `developer` messages render as `system` where the template has no developer role;
- `tools`: a template that renders them gets them; for one that does not (the default SmolLM2's),
  the tools are written into the system prompt in the tool parser's format and the history's
  tool calls and results into text (`tool_prompt`);
- `documents`: likewise, to the template or into the system prompt;
- `reasoning_effort` reaches the template as `reasoning_effort` and `enable_thinking` kwargs
  (unless the request's own kwargs set them).
Also the per-choice `OutputPlan` (which parsers read the answer). Never touches the engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loom.serving.choice_output import OutputPlan
from loom.serving.templates import TemplateRenderer
from loom.serving.tool_prompt import messages_with_tool_prompt
from loom.serving.types import ChatMessage, ChatRequest, TemplateOptions
from loom.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ParserConfig:
    """The server's parsers (`loom serve --tool-call-parser / --reasoning-parser`, or by model family)."""

    tool_parser: str = "hermes"
    reasoning_parser: str | None = None


def output_plan(req: ChatRequest, parsers: ParserConfig) -> OutputPlan:
    return OutputPlan(
        tools=req.tools,
        tool_parser=parsers.tool_parser if req.tools is not None else None,
        reasoning_parser=parsers.reasoning_parser,
        include_reasoning=req.reasoning.include,
    )


async def render_chat_prompt(
    req: ChatRequest, tok: Tokenizer, renderer: TemplateRenderer, parsers: ParserConfig
) -> str:
    source = req.template.chat_template or req.template.chat_template_kwargs.get("chat_template") or tok.chat_template
    reads = str(source or "")
    messages = [m.as_template_dict() for m in req.messages]
    if "developer" not in reads:
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    tools = [t.as_dict() for t in req.tools.tools] if req.tools is not None else None
    if tools is not None and "tools" not in reads:
        messages = messages_with_tool_prompt(messages, tools, parsers.tool_parser)
        tools = None
    documents = [dict(d) for d in req.documents] or None
    if documents is not None and "documents" not in reads:
        messages = _with_documents(messages, documents)
        documents = None
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token}
    chat_messages = tuple(_chat_message(m) for m in messages)
    options = _with_reasoning_kwargs(req.template, req.reasoning.effort)
    return await renderer.render(chat_messages, options, tok.chat_template, special, tools=tools, documents=documents)


def _chat_message(message: Mapping[str, Any]) -> ChatMessage:
    extra = {k: v for k, v in message.items() if k not in ("role", "content")}
    return ChatMessage(str(message["role"]), message.get("content"), extra)


def _with_documents(messages: list[dict[str, Any]], documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    listed = "\n\n".join(
        f"Document {i + 1}" + (f" ({d['title']})" if d.get("title") else "") + f":\n{d.get('text', json.dumps(d))}"
        for i, d in enumerate(documents)
    )
    note = "Answer using these documents:\n\n" + listed
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{note}".strip()}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _with_reasoning_kwargs(options: TemplateOptions, effort: str | None) -> TemplateOptions:
    if effort is None:
        return options
    ours = {"reasoning_effort": effort, "enable_thinking": effort != "none"}
    return dataclasses.replace(options, chat_template_kwargs={**ours, **options.chat_template_kwargs})
