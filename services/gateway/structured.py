"""Structured-output options of a request body -> ``(structured_kind, structured_spec)``.

OpenAI's ``response_format`` (``{"type": "text" | "json_object" | "json_schema"}``) and vLLM's
extras (``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``), on both
``/v1/chat/completions`` and ``/v1/completions``. At most one of them may ask for a structure.
The spec is compiled here (``common.engine.grammar.grammar_for``, cached by spec text) so a
malformed or unsupported schema, regex or grammar is a 400 naming the parameter, before any
work is queued.
"""

from __future__ import annotations

import json
from typing import Any

from common.engine.grammar import GrammarError, grammar_for
from services.gateway.json_fields import bad_request

__all__ = ["parse_structured", "MAX_SPEC_CHARS", "MAX_CHOICES"]

# A schema or grammar is compiled per request: bound the work one body can ask for.
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 256
_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def parse_structured(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """The structured kind and spec a body asks for, ``(None, None)`` for free text; 400 on bad input."""
    found: list[tuple[str, str, str | None]] = []  # (param, kind, spec)
    response_format = _response_format(body.get("response_format"))
    if response_format is not None:
        found.append(response_format)
    for name in _GUIDED:
        value = body.get(name)
        if value is not None:
            found.append(_guided(name, value))
    if not found:
        return None, None
    if len(found) > 1:
        names = ", ".join(f"'{param.split('.')[0]}'" for param, _, _ in found)
        raise bad_request(f"only one structured-output option may be given, got {names}",
                          param=found[1][0].split(".")[0])
    param, kind, spec = found[0]
    if spec is not None and len(spec) > MAX_SPEC_CHARS:
        raise bad_request(f"the {kind} spec is {len(spec)} characters; the limit is {MAX_SPEC_CHARS}", param=param)
    try:
        grammar_for(kind, spec)
    except GrammarError as exc:
        raise bad_request(str(exc), param=param) from None
    return kind, spec


def _response_format(value: Any) -> tuple[str, str, str | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("'response_format' must be an object", param="response_format", code="invalid_type")
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return "response_format", "json_object", None
    if kind != "json_schema":
        raise bad_request(
            f"response_format type {kind!r} is not supported (use 'text', 'json_object' or 'json_schema')",
            param="response_format.type", code="unsupported_parameter",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format of type 'json_schema' needs a 'json_schema' object",
                          param="response_format.json_schema", code="invalid_type")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise bad_request("'response_format.json_schema.name' must be a string",
                          param="response_format.json_schema.name", code="invalid_type")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request("'response_format.json_schema.strict' must be a boolean",
                          param="response_format.json_schema.strict", code="invalid_type")
    schema = spec.get("schema")
    if schema is None:  # OpenAI allows leaving it out: any JSON object
        return "response_format.json_schema", "json_object", None
    param = "response_format.json_schema.schema"
    if not isinstance(schema, dict):
        raise bad_request("'response_format.json_schema.schema' must be a JSON schema object", param=param,
                          code="invalid_type")
    return param, "json_schema", json.dumps(schema)


def _guided(name: str, value: Any) -> tuple[str, str, str | None]:
    if name == "guided_json":
        if isinstance(value, str):  # vLLM takes the schema as an object or as JSON text
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise bad_request(f"'guided_json' is not valid JSON: {exc}", param=name) from None
        if not isinstance(value, dict):
            raise bad_request("'guided_json' must be a JSON schema object", param=name, code="invalid_type")
        return name, "json_schema", json.dumps(value)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_request("'guided_choice' must be a non-empty array of non-empty strings", param=name,
                              code="invalid_type")
        if len(value) > MAX_CHOICES:
            raise bad_request(f"'guided_choice' may hold at most {MAX_CHOICES} strings", param=name)
        return name, "choice", json.dumps(value)
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{name}' must be a non-empty string", param=name, code="invalid_type")
    return name, ("regex" if name == "guided_regex" else "grammar"), value
