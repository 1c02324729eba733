"""Tool-call and reasoning parsers: text deltas in, plain results out; a registry by model family.

A leaf package: imports nothing from `api`, `serving`, `engine` or `platform` (an import-linter
contract says so), so every parser can be used and tested on text alone. Serving builds one
`ChoiceParser` per choice (`make_choice_parser`), feeds it each text delta, calls `finish()` at
the end, and turns the `ParsedDelta`s into message content, reasoning and tool calls.
"""

from loom.parsers.pipeline import ChoiceParser, make_choice_parser, merge
from loom.parsers.registry import (
    DEFAULT_TOOL_PARSER,
    canonical_reasoning_parser_name,
    canonical_tool_parser_name,
    get_reasoning_parser,
    get_tool_parser,
    reasoning_parser_for_model,
    reasoning_parser_names,
    tool_parser_for_model,
    tool_parser_names,
)
from loom.parsers.types import (
    EMPTY_DELTA,
    ParsedDelta,
    ParsedOutput,
    ReasoningParser,
    ReasoningParserFactory,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    ToolParserFactory,
    collect,
    new_call_id,
)

__all__ = [
    "DEFAULT_TOOL_PARSER",
    "EMPTY_DELTA",
    "ChoiceParser",
    "ParsedDelta",
    "ParsedOutput",
    "ReasoningParser",
    "ReasoningParserFactory",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "ToolParserFactory",
    "canonical_reasoning_parser_name",
    "canonical_tool_parser_name",
    "collect",
    "get_reasoning_parser",
    "get_tool_parser",
    "make_choice_parser",
    "merge",
    "new_call_id",
    "reasoning_parser_for_model",
    "reasoning_parser_names",
    "tool_parser_for_model",
    "tool_parser_names",
]
