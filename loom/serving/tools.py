"""Tools a chat request declares, and what its `tool_choice` makes of them.

Owns serving's tool types (`ToolSpec`, `ToolOptions`), the JSON-Schema check of each function's
`parameters`, and the constraint that makes a forced call exact (vLLM's way):
- `required`: the output is a JSON array of `{"name", "parameters"}` objects, each matching one
  tool's schema (at most one item when `parallel_tool_calls` is false);
- a named function: the output is that function's arguments object, matching its schema;
- `auto`: no constraint; the model writes calls in the tool parser's markup, which is parsed;
- `none`: tools are neither rendered nor parsed.
Never touches tensors or HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from loom.serving.structured import StructuredOutputSpec
from loom.serving.types import InvalidRequest

ToolChoiceMode = Literal["none", "auto", "required", "named"]


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str | None
    parameters: str  # the JSON schema as canonical JSON text ("{}" when the function takes anything)

    def as_dict(self) -> dict[str, Any]:
        """The OpenAI shape templates and tool prompts read."""
        function: dict[str, Any] = {"name": self.name, "parameters": json.loads(self.parameters)}
        if self.description is not None:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolOptions:
    tools: tuple[ToolSpec, ...]
    mode: ToolChoiceMode
    named: str | None = None  # the function `tool_choice` names (mode "named")
    parallel: bool = True
    legacy_functions: bool = False  # sent as `functions`: answer in `function_call`, not `tool_calls`

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def constraint(self) -> StructuredOutputSpec | None:
        """The output constraint of a forced call; None when the model chooses."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.name == self.named)
            return StructuredOutputSpec("json", tool.parameters, param="tool_choice")
        if self.mode == "required":
            return StructuredOutputSpec("json", json.dumps(self._calls_schema()), param="tool_choice")
        return None

    def _calls_schema(self) -> dict[str, Any]:
        one_call = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "parameters": json.loads(t.parameters)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in self.tools
        ]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": one_call}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema


def tool_spec(index: int, name: str, description: str | None, parameters: dict[str, Any] | None) -> ToolSpec:
    """One declared function; a `parameters` that is not a JSON Schema is a 422 naming the tool."""
    schema = {} if parameters is None else parameters
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(
            f"tools[{index}] ({name!r}): 'parameters' is not a valid JSON Schema: {exc.message}", "tools", 422
        ) from None
    return ToolSpec(name, description, json.dumps(schema, separators=(",", ":"), sort_keys=True))


def tool_options(
    tools: tuple[ToolSpec, ...], choice: str | None, named: str | None, parallel: bool, legacy: bool = False
) -> ToolOptions | None:
    """The request's tool plan, or None when no tool is in play; inconsistent choices are 4xx."""
    if choice is None:
        choice = "auto" if tools else "none"
    if named is not None:
        if not tools:
            raise InvalidRequest(f"tool_choice names {named!r}, but no tools are given", "tool_choice", 422)
        if named not in {t.name for t in tools}:
            raise InvalidRequest(f"tool_choice names {named!r}, which is not among the tools", "tool_choice", 422)
        return ToolOptions(tools, "named", named, parallel, legacy)
    if choice == "required" and not tools:
        raise InvalidRequest("tool_choice 'required' needs at least one tool", "tool_choice", 422)
    if len({t.name for t in tools}) != len(tools):
        raise InvalidRequest("tools must have distinct function names", "tools", 422)
    if choice == "none" or not tools:
        return None
    return ToolOptions(tools, "required" if choice == "required" else "auto", None, parallel, legacy)
