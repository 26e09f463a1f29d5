"""Which JSON schemas the grammar library enforces exactly: the rest are refused, so that every accepted
schema's answer validates.

xgrammar 0.2.9 compiles some keywords without enforcing them: the grammar then allows answers that
the schema rejects. Each rule below was found by compiling a schema and feeding the matcher an
instance that violates it (tests/test_structured_engine.py keeps that table, so a library upgrade
that enforces one of them shows up as a failing test, and its refusal can go). Keywords outside
JSON Schema's vocabulary are left alone: validators ignore them too. Of the formats that validators
check (jsonschema's FormatChecker), the library enforces email and uuid exactly, checks date and ipv4
more loosely (it allows 2024-02-30 and 01.2.3.4), so those two are compiled as exact patterns instead,
and ignores regex, idn-email and idn-hostname, which are refused; any other format is left to the
library (its own pattern where it has one) or is an annotation, as JSON Schema's default is.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import jsonschema

# Compiled but not enforced: the answer may break them.
IGNORED = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies", "contains",
           "minContains", "maxContains", "$dynamicRef", "$recursiveRef")
# Formats that validators check and the library does not.
IGNORED_FORMATS = ("regex", "idn-email", "idn-hostname")
_YEAR = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})"  # 0001-9999, as Python's date
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"  # no leading zero, as Python's ipaddress
# Formats the library checks loosely, as patterns that allow exactly what the validators do (RFC 3339 full-date
# with real calendar days and leap years; dotted-quad IPv4), compiled in their place.
EXACT_FORMATS = {
    "date": (f"^(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
             "|02-(?:0[1-9]|1[0-9]|2[0-8]))|(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]"
             "|[13579][26])00)-02-29)$"),
    "ipv4": f"^{_OCTET}(?:\\.{_OCTET}){{3}}$",
}
# Keywords that constrain an instance (draft 2020-12 and the older drafts' spellings); the others are annotations.
ASSERTING = frozenset(IGNORED + (
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum", "maxLength",
    "minLength", "pattern", "format", "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties",
    "required", "anyOf", "oneOf", "prefixItems", "items", "additionalItems", "properties", "patternProperties",
    "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties", "$ref"))
# Enforced only where the node's `type` names the kind they apply to; without it the library drops them.
TYPED = {"minLength": "string", "maxLength": "string", "pattern": "string", "format": "string",
         "minimum": "number", "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number",
         "multipleOf": "number", "items": "array", "prefixItems": "array", "minItems": "array", "maxItems": "array",
         "uniqueItems": "array", "unevaluatedItems": "array"}
# Enum and const values are the answer's only choices; these beside them are checked against each value.
SCALAR = frozenset(("type", *(k for k, kind in TYPED.items() if kind in ("string", "number"))))
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMAS = ("items", "additionalItems", "additionalProperties", "propertyNames", "unevaluatedProperties",
            "unevaluatedItems", "contains", "not", "if", "then", "else")
_SCHEMA_LISTS = ("prefixItems", "items", "anyOf", "allOf", "oneOf")


def exact(schema: dict) -> dict:
    """The schema as it is compiled: a copy with each format of EXACT_FORMATS replaced by its pattern."""
    schema = copy.deepcopy(schema)
    for _, node in _nodes(schema, "#"):
        if isinstance(node.get("format"), str) and node["format"] in EXACT_FORMATS and "pattern" not in node:
            node["pattern"] = EXACT_FORMATS[node.pop("format")]
    return schema


def unenforced(schema: dict) -> str | None:
    """Why the library cannot enforce this schema exactly (the first reason, with where), or None if it can."""
    for path, node in _nodes(schema, "#"):
        why = _node(node, schema)
        if why:
            return f"{why} (at {path}); the grammar library would not enforce it, so the answer could fail the schema"
    return None


def _nodes(node: object, path: str) -> Iterator[tuple[str, dict]]:
    if not isinstance(node, dict):
        return
    yield path, node
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            for name, child in node[key].items():
                yield from _nodes(child, f"{path}/{key}/{name}")
    for key in _SCHEMAS:
        yield from _nodes(node.get(key), f"{path}/{key}")
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            for i, child in enumerate(node[key]):
                yield from _nodes(child, f"{path}/{key}/{i}")


def _node(node: dict, root: dict) -> str | None:
    ignored = [k for k in IGNORED if k in node]
    if ignored:
        return f"{ignored[0]} is not supported"
    if node.get("uniqueItems") is True:
        return "uniqueItems is not supported"
    if node.get("format") in IGNORED_FORMATS:
        return f"format {node['format']} is not supported"
    if node.get("format") in EXACT_FORMATS and "pattern" in node:
        return f"pattern beside format {node['format']} is not supported"
    for key in ("$ref", "anyOf", "oneOf"):
        if key in node:
            beside = sorted(k for k in node if k in ASSERTING and k != key)
            if beside:
                return f"{beside[0]} beside {key} is not supported (put it inside)"
    if "$ref" in node and not (node["$ref"] == "#" or node["$ref"].startswith("#/")):
        return f"$ref {node['$ref']!r} is not supported (only local references, #/...)"
    if "oneOf" in node and _overlapping(node["oneOf"], root):
        return ("oneOf is supported only where each alternative requires a property whose const or enum values the "
                "others do not share (a tagged union); use anyOf")
    if "enum" in node or "const" in node:
        return _choices(node)
    declared = node.get("type", [])
    declared = {declared} if isinstance(declared, str) else set(declared)
    kinds = declared | {"number"} if "integer" in declared else declared
    untyped = [k for k, kind in TYPED.items() if k in node and kind not in kinds]
    if untyped:
        return f"{untyped[0]} needs \"type\": \"{TYPED[untyped[0]]}\" in the same schema"
    if "multipleOf" in node and not (isinstance(node["multipleOf"], int) and "integer" in declared
                                     and "number" not in declared):
        return "multipleOf is supported only on \"type\": \"integer\" with an integer divisor"
    missing = [r for r in node.get("required", []) if r not in node.get("properties", {})]
    if missing:
        return f"required names {missing[0]!r}, which properties does not declare"
    return None


def _choices(node: dict) -> str | None:
    """The library takes enum and const alone: each value must satisfy the keywords beside them."""
    beside = {k: v for k, v in node.items() if k in ASSERTING and k not in ("enum", "const")}
    other = sorted(set(beside) - SCALAR)
    if other:
        return f"{other[0]} beside enum or const is not supported"
    validator = jsonschema.Draft202012Validator(beside, format_checker=jsonschema.FormatChecker())
    for value in [node["const"]] if "const" in node else node["enum"]:
        errors = list(validator.iter_errors(value))
        if errors:
            return f"the value {json.dumps(value)} fails the schema beside it ({errors[0].validator})"
    return None


def _overlapping(alternatives: list, root: dict) -> bool:
    """Whether two alternatives could both match an answer: no required property tells them apart by value."""
    branches = [_resolve(b, root) for b in alternatives]
    if not branches or not all(isinstance(b, dict) for b in branches):
        return True
    for name in set.intersection(*(set(b.get("required", [])) for b in branches)):
        values = [_values(b.get("properties", {}).get(name)) for b in branches]
        if all(v is not None for v in values) and sum(map(len, values)) == len(set().union(*values)):
            return False
    return True


def _values(schema: object) -> set[str] | None:
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return {json.dumps(schema["const"], sort_keys=True)}
    if "enum" in schema:
        return {json.dumps(v, sort_keys=True) for v in schema["enum"]}
    return None


def _resolve(node: object, root: dict) -> object:
    """A local $ref's target (one level), or the node itself."""
    if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/")):
        return node
    target: object = root
    for part in node["$ref"][2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            return None
        target = target[part]
    return target
