"""The wire's structured-output fields, in all three spellings, into serving's one `StructuredOutputSpec`.

Owns reading `guided_json` (an object or a JSON string), `guided_regex`, `guided_choice`,
`guided_grammar`, `guided_whitespace_pattern`, `guided_decoding_backend`, `structured_outputs{...}`
and `response_format` (`json_object`, `json_schema` with name / schema / strict, `structural_tag`
in its `format` and legacy `structures` + `triggers` forms), and the checks that need no
compiler: at most one constraint per request, a schema where one is needed, no empty choice list,
no constraint with beam search. Each is a 422 naming the field. Whether a constraint compiles,
and its size limits, are serving's (`loom/serving/structured.py`).
"""

from __future__ import annotations

import json
from typing import Any

from loom.api.errors import UnprocessableEntityError
from loom.api.protocol import SamplingFields
from loom.api.protocol_structured import StructuralTagResponseFormat
from loom.engine.grammar import GrammarKind
from loom.serving.structured import StructuredOutputSpec

_Constraint = tuple[str, GrammarKind, str]  # (wire field, kind, text)


def structured_spec(req: SamplingFields) -> StructuredOutputSpec | None:
    """The request's constraint, or None; raises UnprocessableEntityError naming the field at fault."""
    found = _guided(req) + _structured_outputs(req) + _response_format(req)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"'{param}'" for param, _, _ in found)
        raise UnprocessableEntityError(
            f"a request takes one structured-output constraint, got {len(found)}: {names}",
            param=found[1][0],
            code="conflicting_constraints",
        )
    param, kind, text = found[0]
    if req.use_beam_search:
        raise UnprocessableEntityError(
            f"use_beam_search does not combine with '{param}': a constraint cannot follow every beam",
            param=param,
            code="unsupported_combination",
        )
    so = req.structured_outputs
    whitespace = req.guided_whitespace_pattern or (so.whitespace_pattern if so else None)
    return StructuredOutputSpec(
        kind=kind,
        text=text,
        whitespace_pattern=whitespace if kind in ("json", "json_object", "structural_tag") else None,
        no_additional_properties=bool(so and so.disable_additional_properties),
        backend=req.guided_decoding_backend or (so.backend if so else None),
        param=param,
    )


def _guided(req: SamplingFields) -> list[_Constraint]:
    found: list[_Constraint] = []
    if req.guided_json is not None:
        found.append(("guided_json", "json", _schema_text(req.guided_json, "guided_json")))
    if req.guided_regex is not None:
        found.append(("guided_regex", "regex", req.guided_regex))
    if req.guided_choice is not None:
        found.append(("guided_choice", "choice", _choice_text(req.guided_choice, "guided_choice")))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", "grammar", _grammar_text(req.guided_grammar, "guided_grammar")))
    return found


def _structured_outputs(req: SamplingFields) -> list[_Constraint]:
    so = req.structured_outputs
    if so is None:
        return []
    param = "structured_outputs"
    found: list[_Constraint] = []
    if so.json_spec is not None:
        found.append((param, "json", _schema_text(so.json_spec, param)))
    if so.regex is not None:
        found.append((param, "regex", so.regex))
    if so.choice is not None:
        found.append((param, "choice", _choice_text(so.choice, param)))
    if so.grammar is not None:
        found.append((param, "grammar", _grammar_text(so.grammar, param)))
    if so.json_object:
        found.append((param, "json_object", ""))
    if so.structural_tag is not None:
        found.append((param, "structural_tag", _tag_text(_json_value(so.structural_tag, param), param)))
    return found


def _response_format(req: SamplingFields) -> list[_Constraint]:
    fmt = req.response_format
    param = "response_format"
    if fmt is None:
        return []
    if isinstance(fmt, StructuralTagResponseFormat):
        tag = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
        return [(param, "structural_tag", _tag_text(tag, param))]
    if fmt.type == "json_object":
        return [(param, "json_object", "")]
    if fmt.type == "json_schema":
        schema = fmt.json_schema.json_schema if fmt.json_schema is not None else None
        if schema is None:
            raise UnprocessableEntityError(
                "response_format of type 'json_schema' needs json_schema.schema", param=param, code="missing_schema"
            )
        return [(param, "json", _schema_text(schema, param))]
    return []


def _json_value(value: str, param: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise UnprocessableEntityError(f"{param} is not valid JSON: {exc}", param=param) from exc


def _schema_text(schema: str | dict[str, Any], param: str) -> str:
    value = _json_value(schema, param) if isinstance(schema, str) else schema
    if not isinstance(value, dict):
        raise UnprocessableEntityError(f"{param} must be a JSON schema object", param=param)
    return _compact(value, param)


def _choice_text(choices: list[str], param: str) -> str:
    if not choices:
        raise UnprocessableEntityError(f"{param} must not be empty (nothing could be generated)", param=param)
    return _compact(choices, param)


def _grammar_text(grammar: str, param: str) -> str:
    if not grammar.strip():
        raise UnprocessableEntityError(f"{param} must not be empty", param=param)
    return grammar


def _tag_text(tag: Any, param: str) -> str:
    if not isinstance(tag, dict) or ("format" not in tag and not ("structures" in tag and "triggers" in tag)):
        raise UnprocessableEntityError(
            f"{param}: a structural tag needs 'format', or both 'structures' and 'triggers'", param=param
        )
    return _compact(tag, param)


def _compact(value: Any, param: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (ValueError, RecursionError) as exc:
        raise UnprocessableEntityError(f"{param} cannot be read as a constraint: {exc}", param=param) from exc
