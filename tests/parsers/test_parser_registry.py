"""The parser registry: names and aliases, unknown names, model families, lazy imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loom.parsers import (
    get_reasoning_parser,
    get_tool_parser,
    reasoning_parser_for_model,
    reasoning_parser_names,
    tool_parser_for_model,
    tool_parser_names,
)


def test_every_registered_name_builds_a_working_parser() -> None:
    for name in tool_parser_names():
        parser = get_tool_parser(name)()
        assert parser.feed("hello").content + parser.finish().content == "hello"
    for name in reasoning_parser_names():
        parser = get_reasoning_parser(name)(prompt_text="")
        first, last = parser.feed("x"), parser.finish()
        assert first.content + first.reasoning + last.content + last.reasoning == "x"
        assert isinstance(parser.in_reasoning, bool)


def test_aliases_and_spellings_resolve() -> None:
    assert get_tool_parser("Llama4-JSON") is get_tool_parser("llama3_json")
    assert get_tool_parser("qwen") is get_tool_parser("hermes")
    assert get_reasoning_parser("think") is get_reasoning_parser("qwen3")


def test_unknown_names_are_a_value_error_listing_the_known() -> None:
    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, pythonic"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="deepseek_r1, mistral, qwen3"):
        get_reasoning_parser("nope")


@pytest.mark.parametrize(
    ("model", "tool", "reasoning"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "hermes", None),
        ("qwen3", "hermes", "qwen3"),
        ("NousResearch/Hermes-3-Llama-3.1-8B", "hermes", None),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3_json", None),
        ("/models/Meta-Llama-3.2-3B-Instruct-Q4_K_M.gguf", "llama3_json", None),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "pythonic", None),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", None),
        ("mistralai/Magistral-Small-2509", "mistral", "mistral"),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "hermes", "deepseek_r1"),
        ("Qwen/QwQ-32B", "hermes", "deepseek_r1"),
        ("SmolLM2-135M-Instruct", "hermes", None),
        ("llama", None, None),  # GGUF's architecture name covers SmolLM2, Llama and Mistral alike
        ("gpt2", None, None),
    ],
)
def test_model_families(model: str, tool: str | None, reasoning: str | None) -> None:
    assert (tool_parser_for_model(model), reasoning_parser_for_model(model)) == (tool, reasoning)


def test_parsers_are_imported_only_when_asked_for() -> None:
    code = "import sys, loom.parsers; print(sorted(m for m in sys.modules if m.startswith('loom.parsers.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in ("hermes", "llama3_json", "mistral", "pythonic", "reasoning"):
        assert f"loom.parsers.{module}'" not in loaded
