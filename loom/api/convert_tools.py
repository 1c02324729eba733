"""Wire `tools` / `tool_choice` / `parallel_tool_calls` and the legacy `functions` /
`function_call` -> serving's `ToolOptions`.

Owns the edge rules of the tool fields: tools or functions (not both), function names as OpenAI
allows them, and the consistency of the choice with the tools (a 422 naming the field); the
JSON-Schema check of each function's parameters is serving's (`tool_spec`).
"""

from __future__ import annotations

import re
from typing import Any

from loom.api.errors import UnprocessableEntityError
from loom.api.protocol import ChatCompletionRequest
from loom.api.protocol_messages import NamedToolChoice
from loom.serving.tools import ToolOptions, ToolSpec, tool_options, tool_spec

_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _declared(req: ChatCompletionRequest) -> tuple[list[tuple[str, str | None, dict[str, Any] | None]], bool]:
    """(name, description, parameters) per function, and whether they came as legacy `functions`."""
    if req.tools is not None and req.functions is not None:
        raise UnprocessableEntityError("send 'tools' or the legacy 'functions', not both", param="functions")
    if req.functions is not None:
        declared = []
        for i, f in enumerate(req.functions):
            if not isinstance(f.get("name"), str):
                raise UnprocessableEntityError(f"functions[{i}] needs a string 'name'", param="functions")
            parameters = f.get("parameters")
            if parameters is not None and not isinstance(parameters, dict):
                raise UnprocessableEntityError(f"functions[{i}].parameters must be an object", param="functions")
            description = f.get("description")
            declared.append((f["name"], description if isinstance(description, str) else None, parameters))
        return declared, True
    return [(t.function.name, t.function.description, t.function.parameters) for t in req.tools or []], False


def _choice(req: ChatCompletionRequest, legacy: bool) -> tuple[str | None, str | None]:
    """(mode or None for the default, named function or None)."""
    if legacy:
        call = req.function_call
        if isinstance(call, dict):
            if not isinstance(call.get("name"), str):
                raise UnprocessableEntityError(
                    "function_call must be 'none', 'auto' or {\"name\": ...}", param="function_call"
                )
            return None, call["name"]
        return call, None
    choice = req.tool_choice if "tool_choice" in req.model_fields_set else None
    if isinstance(choice, NamedToolChoice):
        return None, choice.function.name
    return choice, None


def to_tool_options(req: ChatCompletionRequest) -> ToolOptions | None:
    declared, legacy = _declared(req)
    param = "functions" if legacy else "tools"
    for name, _, _ in declared:
        if not _FUNCTION_NAME.match(name):
            raise UnprocessableEntityError(
                f"function name {name[:80]!r} must be 1-64 letters, digits, '_', '.' or '-'", param=param
            )
    mode, named = _choice(req, legacy)
    explicit = mode is not None or named is not None
    if (req.tools == [] or req.functions == []) and explicit and mode != "none":
        raise UnprocessableEntityError(f"an empty '{param}' array cannot be combined with a tool choice", param=param)
    specs: tuple[ToolSpec, ...] = tuple(tool_spec(i, n, d, p) for i, (n, d, p) in enumerate(declared))
    return tool_options(specs, mode, named, req.parallel_tool_calls is not False, legacy)
