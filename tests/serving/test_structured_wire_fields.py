"""Every wire spelling of a structured-output constraint becomes the same `StructuredOutputSpec`,
and the conflicts the converter can see alone are a 422 naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loom.api.errors import UnprocessableEntityError
from loom.api.protocol import ChatCompletionRequest
from loom.api.structured import structured_spec
from loom.serving.structured import StructuredOutputSpec

MESSAGES = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
COMPACT = json.dumps(SCHEMA, separators=(",", ":"))
TAG_FORMAT = {
    "type": "triggered_tags",
    "triggers": ["<f>"],
    "tags": [{"begin": "<f>", "content": {"type": "any_text"}, "end": "</f>"}],
}
LEGACY_TAG = {"structures": [{"begin": "<f=x>", "schema": SCHEMA, "end": "</f>"}], "triggers": ["<f="]}


def spec_of(**fields: Any) -> StructuredOutputSpec | None:
    return structured_spec(ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields}))


@pytest.mark.parametrize(
    ("fields", "kind", "text"),
    [
        ({"guided_json": SCHEMA}, "json", COMPACT),
        ({"guided_json": json.dumps(SCHEMA, indent=2)}, "json", COMPACT),
        ({"structured_outputs": {"json": SCHEMA}}, "json", COMPACT),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}}, "json", COMPACT),
        ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+"),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
        ({"guided_choice": ["a", "b"]}, "choice", '["a","b"]'),
        ({"structured_outputs": {"choice": ["a", "b"]}}, "choice", '["a","b"]'),
        ({"guided_grammar": 'start: "x"'}, "grammar", 'start: "x"'),
        ({"structured_outputs": {"grammar": 'start: "x"'}}, "grammar", 'start: "x"'),
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        ({"structured_outputs": {"json_object": True}}, "json_object", ""),
    ],
)  # fmt: skip
def test_each_spelling_gives_one_spec(fields: dict[str, Any], kind: str, text: str) -> None:
    spec = spec_of(**fields)
    assert spec is not None and (spec.kind, spec.text) == (kind, text)
    assert spec.param == next(iter(fields))
    assert spec.whitespace_pattern is None  # compact JSON unless asked otherwise


def test_structural_tags_in_both_forms_and_both_places() -> None:
    for fields in (
        {"response_format": {"type": "structural_tag", "format": TAG_FORMAT}},
        {"structured_outputs": {"structural_tag": json.dumps({"type": "structural_tag", "format": TAG_FORMAT})}},
    ):
        spec = spec_of(**fields)
        assert spec is not None and spec.kind == "structural_tag" and json.loads(spec.text)["format"] == TAG_FORMAT
    for fields in (
        {"response_format": {"type": "structural_tag", **LEGACY_TAG}},
        {"structured_outputs": {"structural_tag": json.dumps(LEGACY_TAG)}},
    ):
        spec = spec_of(**fields)
        assert spec is not None and json.loads(spec.text) == LEGACY_TAG


def test_options_and_backend_are_carried() -> None:
    spec = spec_of(guided_json=SCHEMA, guided_whitespace_pattern=r"[ ]?", guided_decoding_backend="xgrammar")
    assert spec is not None and spec.whitespace_pattern == "[ ]?" and spec.backend == "xgrammar"
    spec = spec_of(structured_outputs={"json": SCHEMA, "disable_additional_properties": True, "_backend": "guidance"})
    assert spec is not None and spec.no_additional_properties and spec.backend == "guidance"
    spec = spec_of(guided_regex="a+", guided_whitespace_pattern=" ")
    assert spec is not None and spec.whitespace_pattern is None  # whitespace is a JSON option


def test_no_constraint_is_none() -> None:
    assert spec_of() is None
    assert spec_of(response_format={"type": "text"}, guided_decoding_backend="xgrammar") is None
    assert spec_of(structured_outputs={"json_object": False}) is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"guided_json": SCHEMA, "guided_regex": "a"}, "guided_regex"),
        ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": "[1, 2]"}, "guided_json"),
        ({"structured_outputs": {"structural_tag": '{"triggers": []}'}}, "structured_outputs"),
        ({"guided_grammar": "  "}, "guided_grammar"),
        ({"guided_regex": "a+", "use_beam_search": True, "n": 2}, "guided_regex"),
    ],
)
def test_conflicts_and_malformed_constraints_are_422_naming_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(UnprocessableEntityError) as info:
        spec_of(**fields)
    assert info.value.param == param


def test_json_schema_without_a_schema_is_422() -> None:
    with pytest.raises((UnprocessableEntityError, ValueError)):
        spec_of(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
