"""Wire models of the structured-output fields: `response_format` (json_object, json_schema,
structural_tag in both spellings of spec 003) and `structured_outputs` (vLLM's newer object).

Owns their shapes and the checks that need no grammar engine; `loom/api/structured.py` turns them
into serving's constraint.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from loom.api.protocol_messages import WireModel


class JsonSchemaFormat(WireModel):
    name: str
    description: str | None = None
    # `schema` would shadow a BaseModel attribute, hence the alias
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given_for_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class LegacyStructuralTag(WireModel):
    begin: str
    end: str
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")


class StructuralTagResponseFormat(WireModel):
    """Both spellings of spec 003: `{format}` (current) or `{structures, triggers}` (legacy)."""

    type: Literal["structural_tag"]
    format: Any = None
    structures: list[LegacyStructuralTag] | None = None
    triggers: list[str] | None = None

    @model_validator(mode="after")
    def _one_spelling_given(self) -> StructuralTagResponseFormat:
        if self.format is None and (self.structures is None or self.triggers is None):
            raise ValueError("structural_tag needs 'format', or both 'structures' and 'triggers'")
        return self


AnyResponseFormat = Annotated[ResponseFormat | StructuralTagResponseFormat, Field(discriminator="type")]


class StructuredOutputs(WireModel):
    """The newer vLLM spelling of the `guided_*` fields (spec 003 `StructuredOutputsParams`)."""

    # `json` would shadow a BaseModel method, hence the alias
    json_spec: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    backend: str | None = Field(default=None, alias="_backend")
    backend_was_auto: bool = Field(default=False, alias="_backend_was_auto")

    @field_validator("choice")
    @classmethod
    def _choices_not_empty(cls, choices: list[str] | None) -> list[str] | None:
        if choices is not None and not choices:
            raise ValueError("choice must list at least one choice")
        return choices
