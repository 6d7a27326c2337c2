"""Replies held to a grammar: a GBNF grammar as given, or a JSON Schema (``json_schema=``, OpenAI's
``response_format``) turned into one by llama.cpp's converter; and the parsed reply.

Everything is checked before anything is decoded: a grammar llama.cpp cannot parse, a schema the
converter rejects, and a schema keyword the converter would silently drop (``multipleOf``, a
number's ``minimum``, ``format: email``...) are a ValueError naming the argument and where in the
schema the keyword is. A grammar is never looser than the schema: where the converter is stricter
(an object without ``additionalProperties`` gets only its listed properties), every reply it lets
through still validates. ``format`` (date, time, date-time, uuid) is held to its shape, field by
field: a date's day is 01..31 whatever the month (JSON Schema itself treats ``format`` as an
annotation unless a validator is told to check it).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, NamedTuple

from . import _core

__all__ = ["Constraint", "constraint", "response_format_constraint", "check_json_schema", "parse_json",
           "JSON_OBJECT_SCHEMA"]

# {"type": "json_object"}: any JSON object.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}

# Keywords that only describe (no effect on which texts are valid).
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                          "readOnly", "writeOnly", "$defs", "definitions", "discriminator"})
# Keywords llama.cpp's converter (common/json-schema.cpp) turns into grammar, by the type they apply to.
_GENERAL = frozenset({"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"})
_BY_TYPE: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}),
    "number": frozenset(), "boolean": frozenset(), "null": frozenset(),
}
_ALL_TYPED = frozenset().union(*_BY_TYPE.values())
_FORMATS = ("date", "time", "date-time", "uuid")


class Constraint(NamedTuple):
    """What a generation is held to: a GBNF grammar ("" for none), and whether its replies are JSON
    to be parsed."""

    grammar: str = ""
    json: bool = False


def _types_of(schema: Mapping[str, Any]) -> list[str]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list) and all(isinstance(k, str) for k in kind):
        return list(kind)
    # No type: the keywords say which one (the converter infers it the same way).
    return [t for t, words in _BY_TYPE.items() if words & schema.keys()]


def check_json_schema(schema: Any, where: str = "#", name: str = "json_schema") -> None:
    """Raise ValueError where ``schema`` uses a keyword the grammar would not enforce."""
    if isinstance(schema, bool):
        return  # true: anything; false: nothing (the converter reports what it cannot do)
    if not isinstance(schema, Mapping):
        raise ValueError(f"{name}: the schema at {where} must be an object, not {type(schema).__name__}")
    types = _types_of(schema)
    for t in types:
        if t not in _BY_TYPE:
            raise ValueError(f"{name}: unknown type {t!r} at {where}")
    allowed = _GENERAL | _ANNOTATIONS | frozenset().union(*(_BY_TYPE[t] for t in types))
    for key in schema:
        if key in allowed:
            continue
        if key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") and "number" in types:
            raise ValueError(f"{name}: {key!r} on a number at {where} is not supported (llama.cpp's grammar "
                             "ranges integers only; use type 'integer', or drop the bound)")
        known = "a keyword of another type" if key in _ALL_TYPED else "not supported by llama.cpp's JSON Schema converter"
        raise ValueError(f"{name}: {key!r} at {where} is {known}; the grammar would not enforce it")
    if "string" in types:
        fmt = schema.get("format")
        if fmt is not None and fmt not in _FORMATS:
            raise ValueError(f"{name}: format {fmt!r} at {where} is not supported (supported: {', '.join(_FORMATS)})")
        shaped = [k for k in ("pattern", "format") if k in schema]
        sized = [k for k in ("minLength", "maxLength") if k in schema]
        if len(shaped) > 1 or (shaped and sized):
            raise ValueError(f"{name}: {' and '.join(shaped + sized)} together at {where}: the grammar would enforce "
                             f"only {shaped[0]!r}; keep one of them")
    for key in ("properties", "$defs", "definitions"):
        for sub, value in (schema.get(key) or {}).items():
            check_json_schema(value, f"{where}/{key}/{sub}", name)
    for key in ("items", "additionalProperties"):
        if key in schema and not isinstance(schema[key], list):
            check_json_schema(schema[key], f"{where}/{key}", name)
    for key in ("anyOf", "oneOf", "allOf", "prefixItems", "items"):
        if isinstance(schema.get(key), list):
            for i, value in enumerate(schema[key]):
                check_json_schema(value, f"{where}/{key}/{i}", name)


def _schema_grammar(schema: Any, name: str) -> str:
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ValueError(f"{name}: not JSON: {e}") from None
    check_json_schema(schema, name=name)
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: the schema is not JSON-serializable: {e}") from None
    try:
        return _core.json_schema_grammar(text)
    except ValueError as e:
        raise ValueError(str(e).replace("json_schema:", f"{name}:", 1)) from None


def constraint(*, grammar: str | None = None, json_schema: Any = None) -> Constraint:
    """The constraint of ``generate(grammar=...)`` / ``generate(json_schema=...)`` (a dict or JSON text)."""
    if grammar is not None and json_schema is not None:
        raise ValueError("grammar and json_schema were both given; pass one of them")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise ValueError("grammar must be a non-empty GBNF string (a rule named 'root' is the start)")
        return Constraint(grammar, False)
    if json_schema is not None:
        return Constraint(_schema_grammar(json_schema, "json_schema"), True)
    return Constraint()


def response_format_constraint(response_format: Any) -> Constraint:
    """OpenAI's ``response_format``: ``{"type": "text"}``, ``{"type": "json_object"}`` or ``{"type":
    "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``."""
    if response_format is None:
        return Constraint()
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return Constraint()
    if kind == "json_object":
        return Constraint(_schema_grammar(JSON_OBJECT_SCHEMA, "response_format"), True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ValueError("response_format.json_schema must be an object with a 'schema' (and a 'name')")
        extra = set(spec) - {"name", "schema", "strict", "description"}
        if extra:
            raise ValueError(f"response_format.json_schema: unknown field(s) {', '.join(sorted(extra))}")
        return Constraint(_schema_grammar(spec["schema"], "response_format.json_schema.schema"), True)
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}")


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, the object) where ``text`` is one JSON value, else (False, None)."""
    try:
        return True, json.loads(text)
    except ValueError:
        return False, None
