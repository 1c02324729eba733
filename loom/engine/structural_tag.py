"""Structural tags (both wire forms) as an llguidance Lark grammar.

Owns the translation of `response_format: {"type": "structural_tag", ...}` and
`structured_outputs.structural_tag` into Lark:
- the legacy form `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`: free text in
  which each structure starts where the model writes one of the triggers (the structure's
  `begin` must start with it), then its JSON follows and its `end` closes it; then free text again;
- the current form `{"format": F}` (xgrammar's structural-tag formats), where F is one of
  `const_string {value}`, `json_schema {json_schema}`, `regex {pattern}`, `grammar {grammar}`,
  `any_text`, `sequence {elements}`, `or {elements}`, `tag {begin, content, end}`,
  `triggered_tags {triggers, tags, at_least_one, stop_after_first}` and
  `tags_with_separator {tags, separator, at_least_one, stop_after_first}`.
Free text is "lazy": it ends at the first trigger, so a trigger always starts its tag.
Raises ValueError (or KeyError / TypeError) on a malformed tag; never compiles anything itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

_ANY_TEXT = r"/(.|\n)*/"
_MAX_DEPTH = 16


class _LarkWriter:
    def __init__(self, json_grammar: Callable[[Any], str]) -> None:
        self.json_grammar = json_grammar  # JSON schema -> llguidance grammar (whitespace options applied)
        self.rules: list[str] = []
        self.side_grammars: list[dict[str, str]] = []

    def rule(self, body: str, lazy: bool = False) -> str:
        name = f"r{len(self.rules)}"
        self.rules.append(f"{name}{'[lazy]' if lazy else ''}: {body}")
        return name

    def side(self, grammar: str) -> str:
        """A named side grammar (its own `start`), referenced as `@name`."""
        name = f"g{len(self.side_grammars)}"
        entry = json.loads(grammar)["grammars"][0] if grammar.lstrip().startswith("{") else {"lark_grammar": grammar}
        self.side_grammars.append({**entry, "name": name})
        return "@" + name

    def format(self, spec: dict[str, Any], depth: int = 0) -> str:
        """An expression matching `spec`."""
        if depth > _MAX_DEPTH:
            raise ValueError(f"structural tag nests deeper than {_MAX_DEPTH} levels")
        kind = spec["type"]
        if kind == "const_string":
            return _literal(spec["value"])
        if kind == "json_schema":
            return self.side(self.json_grammar(spec["json_schema"]))
        if kind == "regex":
            return "/" + llguidance.regex_to_lark(str(spec["pattern"])) + "/"
        if kind == "grammar":
            return self.side(str(llguidance.LLMatcher.grammar_from_lark(any_to_lark(str(spec["grammar"])))))
        if kind == "any_text":
            return _ANY_TEXT
        if kind in ("sequence", "or"):
            parts = [self.format(e, depth + 1) for e in spec["elements"]]
            if not parts:
                raise ValueError(f"'{kind}' needs at least one element")
            return "(" + (" " if kind == "sequence" else " | ").join(parts) + ")"
        if kind == "tag":
            return self.tag(spec, None, depth)
        if kind == "triggered_tags":
            return self.triggered(spec, depth)
        if kind == "tags_with_separator":
            tags = [self.tag(t, None, depth + 1) for t in spec["tags"]]
            one = "(" + " | ".join(tags) + ")"
            many = one if spec.get("stop_after_first") else f"{one} ({_literal(spec.get('separator', ''))} {one})*"
            return many if spec.get("at_least_one") else f"({many})?"
        raise ValueError(f"unknown structural tag format type {kind!r}")

    def tag(self, spec: dict[str, Any], trigger: str | None, depth: int) -> str:
        """`begin content end`; with a trigger, the free text before it is part of the tag's lexeme."""
        begin, end = str(spec["begin"]), str(spec["end"])
        content = spec.get("content", {"type": "any_text"})
        if content.get("type") == "any_text":  # text up to the end string: one lazy lexeme
            head = self.rule(f"{_ANY_TEXT} {_literal(trigger)}", lazy=True) if trigger else ""
            rest = begin[len(trigger) :] if trigger else begin
            return self.rule(f"{head} {self.rule(f'{_literal(rest)} {_ANY_TEXT} {_literal(end)}', lazy=True)}")
        body = self.format(content, depth + 1)
        if trigger is None:
            return self.rule(f"{_literal(begin)} {body} {_literal(end)}")
        head = self.rule(f"{_ANY_TEXT} {_literal(trigger)}", lazy=True)
        return self.rule(f"{head} {_literal(begin[len(trigger) :])} {body} {_literal(end)}")

    def triggered(self, spec: dict[str, Any], depth: int) -> str:
        triggers = [str(t) for t in spec["triggers"]]
        if not triggers or not spec["tags"]:
            raise ValueError("triggered_tags needs triggers and tags")
        tags = []
        for t in spec["tags"]:
            trigger = next((tr for tr in triggers if str(t["begin"]).startswith(tr)), None)
            if trigger is None:
                raise ValueError(f"tag begin {t['begin']!r} starts with none of the triggers {triggers}")
            tags.append(self.tag(t, trigger, depth + 1))
        one = "(" + " | ".join(tags) + ")"
        if spec.get("stop_after_first"):
            return one if spec.get("at_least_one") else f"({one} | {_ANY_TEXT})"
        return f"{one}{'+' if spec.get('at_least_one') else '*'} {_ANY_TEXT}"

    def grammar(self, top: str) -> str:
        lark = "\n".join([f"start: {top}", *self.rules])
        if not self.side_grammars:
            return lark
        return json.dumps({"grammars": [{"name": "main", "lark_grammar": lark}, *self.side_grammars]})


def structural_tag_to_lark(tag: dict[str, Any], json_grammar: Callable[[Any], str]) -> str:
    """The llguidance grammar of a structural tag in either form (see the module docstring)."""
    if not isinstance(tag, dict):
        raise ValueError("a structural tag must be a JSON object")
    writer = _LarkWriter(json_grammar)
    if "format" in tag:
        top = writer.format(tag["format"])
    else:
        legacy = [{"begin": s["begin"], "content": _schema_content(s), "end": s["end"]} for s in tag["structures"]]
        top = writer.triggered({"triggers": tag["triggers"], "tags": legacy}, 0)
    return writer.grammar(top)


def _schema_content(structure: dict[str, Any]) -> dict[str, Any]:
    schema = structure.get("schema")
    return {"type": "any_text"} if schema is None else {"type": "json_schema", "json_schema": schema}


def _literal(text: str | None) -> str:
    return json.dumps(text or "")
