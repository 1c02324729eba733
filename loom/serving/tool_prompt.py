"""Tools taught in the system prompt, for models whose chat template ignores `tools`.

Owns the text that tells such a model (the default SmolLM2) which functions exist and how to
call them in a tool parser's format (Hermes by default), and the rewrite of a conversation's
tool history into plain text turns: an assistant's earlier `tool_calls` become that format's
markup in its content, `tool` / `function` results become a user turn. Pure text functions on
template message dicts: never renders a template, never parses model output (the parser does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loom.parsers import DEFAULT_TOOL_PARSER, canonical_tool_parser_name

_HERMES_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
If no function fits, answer the user directly."""

_LLAMA3_PROMPT = """Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.

Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. Do not use variables. Separate several calls with "; ". If no function fits, answer the user directly.

{tools}"""

_MISTRAL_PROMPT = """You can call the functions below. To call one or more of them, answer with [TOOL_CALLS] followed by a JSON list of calls, each {{"name": <function-name>, "arguments": <args-json-object>}}:
[TOOL_CALLS][{{"name": "function_name", "arguments": {{"argument": "value"}}}}]
If no function fits, answer the user directly.

Available functions:
{tools}"""

_PYTHONIC_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible functions. Based on the question, you will need to make one or more function/tool calls to achieve the purpose. If none of the functions can be used, answer the user directly.

If you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]
You SHOULD NOT include any other text in the response when you call functions.

Here is a list of functions in JSON format that you can invoke.

{tools}"""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _python_literal(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_json(str(k))}: {_python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    return _json(value)  # strings and numbers: JSON's spelling is also Python's


def _unwrap(item: Mapping[str, Any]) -> Mapping[str, Any]:
    """OpenAI's {"type": "function", "function": {...}} as its inner object; a flat one as it is."""
    inner = item.get("function")
    return inner if isinstance(inner, Mapping) else item


def _function(tool: Mapping[str, Any]) -> dict[str, Any]:
    """A tool as {name, description, parameters}."""
    function = _unwrap(tool)
    out = {"name": function.get("name", ""), "description": function.get("description", "")}
    out["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
    return out


def _call(tool_call: Mapping[str, Any]) -> tuple[str, Any]:
    """(name, arguments) of an earlier call; arguments as an object when its JSON text parses."""
    function = _unwrap(tool_call)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # the client's text as it is: the model sees what was sent
    return str(function.get("name", "")), arguments


def _hermes_calls(calls: list[tuple[str, Any]]) -> str:
    return "\n".join(f"<tool_call>\n{_json({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)


def _llama3_calls(calls: list[tuple[str, Any]]) -> str:
    return "; ".join(_json({"name": n, "parameters": a}) for n, a in calls)


def _mistral_calls(calls: list[tuple[str, Any]]) -> str:
    return "[TOOL_CALLS]" + _json([{"name": n, "arguments": a} for n, a in calls])


def _pythonic_call(name: str, arguments: Any) -> str:
    if not isinstance(arguments, dict):
        arguments = {"arguments": arguments}
    return f"{name}(" + ", ".join(f"{k}={_python_literal(v)}" for k, v in arguments.items()) + ")"


def _pythonic_calls(calls: list[tuple[str, Any]]) -> str:
    return "[" + ", ".join(_pythonic_call(n, a) for n, a in calls) + "]"


def _hermes_result(content: str, name: str | None) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def _plain_result(content: str, name: str | None) -> str:
    return f"Result of {name}:\n{content}" if name else f"Tool result:\n{content}"


def _mistral_result(content: str, name: str | None) -> str:
    return f"[TOOL_RESULTS]{_json({'content': content})}[/TOOL_RESULTS]"


@dataclass(frozen=True, slots=True)
class _Format:
    prompt: str  # with {tools}
    tool_line: Callable[[dict[str, Any]], str]  # one function's line in the prompt
    calls: Callable[[list[tuple[str, Any]]], str]
    result: Callable[[str, str | None], str]


_FORMATS = {
    "hermes": _Format(
        _HERMES_PROMPT, lambda f: _json({"type": "function", "function": f}), _hermes_calls, _hermes_result
    ),
    "llama3_json": _Format(
        _LLAMA3_PROMPT, lambda f: _json({"type": "function", "function": f}), _llama3_calls, _plain_result
    ),
    "mistral": _Format(_MISTRAL_PROMPT, _json, _mistral_calls, _mistral_result),
    "pythonic": _Format(_PYTHONIC_PROMPT, _json, _pythonic_calls, _plain_result),
}


def _format(parser_name: str) -> _Format:
    return _FORMATS[canonical_tool_parser_name(parser_name)]  # ValueError for an unknown name


def render_tool_prompt(tools: Sequence[Mapping[str, Any]], parser_name: str = DEFAULT_TOOL_PARSER) -> str:
    """The system-prompt text that teaches `tools` and the call format of `parser_name`."""
    fmt = _format(parser_name)
    return fmt.prompt.format(tools="\n".join(fmt.tool_line(_function(tool)) for tool in tools))


def render_tool_calls(tool_calls: Sequence[Mapping[str, Any]], parser_name: str = DEFAULT_TOOL_PARSER) -> str:
    """An assistant's earlier calls (OpenAI's `tool_calls` items) as the format's markup."""
    return _format(parser_name).calls([_call(tool_call) for tool_call in tool_calls])


def render_tool_result(content: str, name: str | None = None, parser_name: str = DEFAULT_TOOL_PARSER) -> str:
    """A `tool` (or legacy `function`) message's content as the text of a user turn."""
    return _format(parser_name).result(content, name)


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list | tuple) else [content]
    return "".join(p if isinstance(p, str) else str(p.get("text", "")) for p in parts if isinstance(p, str | Mapping))


def messages_with_tool_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]],
    parser_name: str = DEFAULT_TOOL_PARSER,
) -> list[dict[str, Any]]:
    """The conversation as a template without tool support can render it.

    The tool prompt joins the first system (or developer) message, or opens the conversation as
    a system message; assistant `tool_calls` (and legacy `function_call`) become markup after
    the content; each run of `tool` / `function` messages becomes one user turn. Every content
    is a string. No tools: the history is rewritten and no prompt is added.
    """
    fmt = _format(parser_name)
    out: list[dict[str, Any]] = []
    previous_was_result = False
    for message in messages:
        role = message.get("role")
        if role in ("tool", "function"):
            text = fmt.result(_text(message.get("content")), message.get("name"))
            if previous_was_result:
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
            previous_was_result = True
            continue
        previous_was_result = False
        rewritten = {k: v for k, v in message.items() if k not in ("tool_calls", "function_call", "tool_call_id")}
        rewritten["content"] = _text(message.get("content"))
        calls = list(message.get("tool_calls") or ())
        if isinstance(message.get("function_call"), Mapping):
            calls.append(message["function_call"])
        if role == "assistant" and calls:
            markup = fmt.calls([_call(call) for call in calls])
            rewritten["content"] = f"{rewritten['content']}\n{markup}" if rewritten["content"] else markup
        out.append(rewritten)
    if tools:
        _add_system_prompt(out, render_tool_prompt(tools, parser_name))
    return out


def _add_system_prompt(messages: list[dict[str, Any]], prompt: str) -> None:
    for message in messages:
        if message.get("role") in ("system", "developer"):
            message["content"] = f"{message['content']}\n\n{prompt}" if message["content"] else prompt
            return
    messages.insert(0, {"role": "system", "content": prompt})
