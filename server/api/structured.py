"""OpenAI's response_format and vLLM's structured_outputs → the engine's `Constraint` (one rule for both)."""

from __future__ import annotations

import json

from server.api.protocol import ResponseFormat, StructuredOutputs
from server.api.serving import ServingError
from server.engine.structured import Constraint

MAX_CHOICE_CHARS = 1024  # one choice string


def constraint_of(response_format: ResponseFormat | None,
                  structured_outputs: StructuredOutputs | None) -> Constraint | None:
    """The request's output constraint, None for free text; a 400 naming the problem for a malformed one."""
    if response_format is not None and response_format.type != "text" and structured_outputs is not None:
        raise ServingError(400, "give either response_format or structured_outputs, not both")
    if structured_outputs is not None:
        return _structured_outputs(structured_outputs)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return Constraint("json_object")
    spec = response_format.json_schema
    if spec is None or spec.schema_ is None:
        raise ServingError(400, "response_format of type json_schema needs json_schema.schema (a JSON Schema object)")
    return Constraint.json_schema(spec.schema_)


def _structured_outputs(so: StructuredOutputs) -> Constraint:
    given = [name for name, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                      ("grammar", so.grammar), ("json_object", so.json_object)) if value]
    if len(given) != 1:
        raise ServingError(400, "structured_outputs takes exactly one of json, regex, choice, grammar, json_object; "
                                f"got {given or 'none'}")
    if so.json_ is not None:
        schema = so.json_
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ServingError(400, f"structured_outputs.json is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ServingError(400, "structured_outputs.json must be a JSON Schema object; "
                                    f"got {type(schema).__name__}")
        return Constraint.json_schema(schema)
    if so.regex is not None:
        return Constraint("regex", so.regex)
    if so.choice is not None:
        long = [i for i, c in enumerate(so.choice) if not c or len(c) > MAX_CHOICE_CHARS]
        if long:
            raise ServingError(400, f"structured_outputs.choice entries must be 1..{MAX_CHOICE_CHARS} characters; "
                                    f"entry {long[0]} is not")
        return Constraint.choice(so.choice)
    if so.grammar is not None:
        return Constraint("grammar", so.grammar)
    return Constraint("json_object")
