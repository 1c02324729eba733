"""The parser registry: names (as `--tool-call-parser` / `--reasoning-parser` take them) to
factories, imported on first use, and the model families each parser serves.

Owns the names, their aliases (vLLM's spellings where they differ) and the family table. Never
builds a parser at import time, and never guesses for a family it does not know: `None` means
"no parser", the caller decides what a model without one gets.
"""

from __future__ import annotations

import importlib
from typing import Any

from loom.parsers.types import ReasoningParserFactory, ToolParserFactory

# name -> (module, attribute): imported when first asked for.
_TOOL_PARSERS: dict[str, tuple[str, str]] = {
    "hermes": ("loom.parsers.hermes", "HermesToolParser"),
    "llama3_json": ("loom.parsers.llama3_json", "Llama3JsonToolParser"),
    "mistral": ("loom.parsers.mistral", "MistralToolParser"),
    "pythonic": ("loom.parsers.pythonic", "PythonicToolParser"),
}
_TOOL_ALIASES = {"qwen": "hermes", "llama4_json": "llama3_json", "llama4_pythonic": "pythonic"}

_REASONING_PARSERS: dict[str, tuple[str, str]] = {
    "qwen3": ("loom.parsers.reasoning", "qwen3"),
    "deepseek_r1": ("loom.parsers.reasoning", "deepseek_r1"),
    "mistral": ("loom.parsers.reasoning", "mistral"),
}
_REASONING_ALIASES = {"think": "qwen3"}

# (substring of the normalized model name or type, parser); the first match wins, so the more
# specific families come first (Hermes-3-Llama-3.1 speaks Hermes, not Llama's JSON).
_TOOL_FAMILIES = (
    ("hermes", "hermes"),
    ("qwen", "hermes"),
    ("qwq", "hermes"),
    ("smollm", "hermes"),
    ("llama-4", "pythonic"),
    ("llama4", "pythonic"),
    ("llama-3", "llama3_json"),
    ("llama3", "llama3_json"),
    ("mistral", "mistral"),
    ("mixtral", "mistral"),
    ("ministral", "mistral"),
    ("devstral", "mistral"),
    ("magistral", "mistral"),
)
_REASONING_FAMILIES = (
    ("deepseek-r1", "deepseek_r1"),
    ("r1-distill", "deepseek_r1"),
    ("qwq", "deepseek_r1"),
    ("qwen3", "qwen3"),
    ("smollm3", "qwen3"),
    ("magistral", "mistral"),
)

DEFAULT_TOOL_PARSER = "hermes"  # the format Loom teaches a model whose template ignores tools


def tool_parser_names() -> tuple[str, ...]:
    return tuple(sorted(_TOOL_PARSERS))


def reasoning_parser_names() -> tuple[str, ...]:
    return tuple(sorted(_REASONING_PARSERS))


def canonical_tool_parser_name(name: str) -> str:
    """The registered name behind `name` (an alias resolved); ValueError listing the known."""
    return _canonical(name, _TOOL_PARSERS, _TOOL_ALIASES, "tool-call")


def canonical_reasoning_parser_name(name: str) -> str:
    return _canonical(name, _REASONING_PARSERS, _REASONING_ALIASES, "reasoning")


def get_tool_parser(name: str) -> ToolParserFactory:
    """The factory of the tool parser `name`: call it once per choice."""
    factory: ToolParserFactory = _load(_TOOL_PARSERS[canonical_tool_parser_name(name)])
    return factory


def get_reasoning_parser(name: str) -> ReasoningParserFactory:
    """The factory of the reasoning parser `name`: call it once per choice, with the prompt."""
    factory: ReasoningParserFactory = _load(_REASONING_PARSERS[canonical_reasoning_parser_name(name)])
    return factory


def tool_parser_for_model(model_type_or_name: str) -> str | None:
    """The tool parser for a model family (a name, a path, or a config `model_type`), or None."""
    return _family(model_type_or_name, _TOOL_FAMILIES)


def reasoning_parser_for_model(model_type_or_name: str) -> str | None:
    return _family(model_type_or_name, _REASONING_FAMILIES)


def _canonical(name: str, table: dict[str, Any], aliases: dict[str, str], kind: str) -> str:
    key = name.strip().lower().replace("-", "_")
    key = aliases.get(key, key)
    if key not in table:
        known = ", ".join(sorted(table))
        raise ValueError(f"unknown {kind} parser {name!r}; known: {known}")
    return key


def _family(model_type_or_name: str, families: tuple[tuple[str, str], ...]) -> str | None:
    key = model_type_or_name.lower().replace("_", "-")
    return next((parser for pattern, parser in families if pattern in key), None)


def _load(entry: tuple[str, str]) -> Any:
    module, attribute = entry
    return getattr(importlib.import_module(module), attribute)
