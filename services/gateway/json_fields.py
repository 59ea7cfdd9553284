"""Reading a JSON request body and its typed fields; the OpenAI-style API error.

Every rejection is an `APIError` carrying the HTTP status and the OpenAI error fields
(`message`, `type`, `param`, `code`), so the app can turn it into `{"error": {...}}` without
knowing where it came from.
"""

from __future__ import annotations

import json
import math
from typing import Any


class APIError(Exception):
    """An error response in OpenAI's shape; `status` is the HTTP status code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or _default_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or "invalid_value")


# ------------------------------------------------------------------------------------ the body


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity, which are not JSON and would poison the sampler.
    raise ValueError(f"{name} is not valid JSON")


# No API body nests anywhere near this deep; far deeper (100,000 levels) made the parser raise
# RecursionError, a 500. Past it: a 400.
MAX_JSON_DEPTH = 64


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Bytes of an HTTP body -> a JSON object, or a 400 saying exactly what is wrong.

    Beyond JSON syntax it refuses nesting deeper than MAX_JSON_DEPTH and strings holding a lone
    UTF-16 surrogate (`"\\ud800"` is valid JSON but no Unicode text: the tokenizer, the bus codec
    and the response encoder all fail on it), naming the field.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_body") from None
    if not text.strip():
        raise bad_request("request body is empty; expected a JSON object", code="invalid_body")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    if not isinstance(body, dict):
        raise bad_request(
            f"request body must be a JSON object, got {json_type(body)}", code="invalid_body"
        )
    # Both checks walk the tree; the raw bytes say cheaply when neither can fail (a surrogate
    # only arrives as a \\u escape; depth needs that many brackets).
    deep = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
    if deep or b"\\u" in raw:
        _check_tree(body)
    return body


def _too_deep() -> APIError:
    return bad_request(f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")


def _has_lone_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _path(parts: tuple) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _check_tree(body: dict[str, Any]) -> None:
    """400 for nesting past MAX_JSON_DEPTH or a lone surrogate in any string (keys included)."""
    stack: list[tuple[Any, int, tuple]] = [(body, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(key, str) and _has_lone_surrogate(key):
                raise _surrogate(path, f"key {key.encode('utf-8', 'backslashreplace').decode()!r}")
            kind = type(value)
            if kind is str:
                if _has_lone_surrogate(value):
                    raise _surrogate((*path, key), "value")
            elif kind is dict or kind is list:
                stack.append((value, depth + 1, (*path, key)))


def _surrogate(path: tuple, what: str) -> APIError:
    where = _path(path)
    return bad_request(f"{'field ' + repr(where) if where else 'the body'} holds a lone UTF-16 surrogate "
                       f"(in its {what}): not valid Unicode text", param=where or None, code="invalid_unicode")


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -------------------------------------------------------------------------------- field readers


class Fields:
    """Typed, param-named access to a body's fields; `None`/absent gives the default."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def _wrong(self, name: str, expected: str, value: Any) -> APIError:
        return bad_request(f"'{name}' must be {expected}, got {json_type(value)} {_short(value)}", param=name,
                           code="invalid_type")

    def int(self, name: str, default: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
            return int(value)  # 2.0 is an integer in JSON's eyes
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._wrong(name, "an integer", value)
        return value

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self._wrong(name, "a number", value)
        if not math.isfinite(value):
            raise bad_request(f"'{name}' must be finite", param=name)
        return float(value)

    def bool(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._wrong(name, "a boolean", value)
        return value

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._wrong(name, "a string", value)
        return value

    def dict(self, name: str) -> dict[str, Any] | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._wrong(name, "an object", value)
        return value


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
