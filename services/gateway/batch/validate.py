"""Checking a batch's input file before anything runs: each bad line becomes an error line.

A line is checked as the endpoint would check it (the same body parser, the chat template, the
context window), so a line that passes here fails later only for reasons nobody could see in
advance (a worker dying past every retry). Problems with the file as a whole (not UTF-8, no
request lines, too many lines) fail the batch instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.gateway.batch.records import LineResult
from services.gateway.chat import chat_prompt_ids
from services.gateway.completions import completion_prompt_ids
from services.gateway.context import GatewayContext
from services.gateway.openai_schema import APIError, check_prompts_for_model, parse_chat_request, \
    parse_completion_request, parse_json_body

__all__ = ["BatchLine", "ValidatedFile", "validate_input", "MAX_LINES"]

MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_CUSTOM_ID = 512


@dataclass(slots=True)
class BatchLine:
    index: int
    custom_id: str
    body: dict[str, Any]


@dataclass(slots=True)
class ValidatedFile:
    lines: list[BatchLine]  # runnable lines
    rejected: list[LineResult]  # error lines, committed before the batch starts
    file_errors: list[dict[str, Any]]  # non-empty: the batch fails

    @property
    def total(self) -> int:
        return len(self.lines) + len(self.rejected)


def _file_error(code: str, message: str, line: int | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": None, "line": line}


def validate_input(ctx: GatewayContext, data: bytes, endpoint: str) -> ValidatedFile:
    """Parse and check every line (runs in a thread: it tokenizes)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return ValidatedFile([], [], [_file_error("invalid_file", f"the input file is not UTF-8 ({exc.reason})")])
    raw_lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not raw_lines:
        return ValidatedFile([], [], [_file_error("empty_file", "the input file has no request lines")])
    if len(raw_lines) > MAX_LINES:
        return ValidatedFile([], [], [_file_error(
            "too_many_requests", f"the input file has {len(raw_lines)} lines; a batch takes at most {MAX_LINES}")])
    out = ValidatedFile([], [], [])
    seen: set[str] = set()
    for index, (line_no, line) in enumerate(raw_lines):
        custom_id = f"line-{line_no}"
        try:
            # the HTTP body parser: nesting depth and lone surrogates are refused as for a request
            item = parse_json_body(line.encode())
            custom_id = _custom_id(item, line_no, seen)
            body = _request_body(item, endpoint)
            _check_body(ctx, body, endpoint)
        except _LineError as exc:
            out.rejected.append(_rejected(index, custom_id, exc.code, f"line {line_no}: {exc}"))
            continue
        except APIError as exc:
            code = "invalid_json_line" if exc.code in ("invalid_json", "invalid_body") else exc.code or "invalid_request"
            if custom_id.startswith("line-"):  # refused before its custom_id was read: name it if it has one
                custom_id = _salvage_custom_id(line, seen) or custom_id
            out.rejected.append(_rejected(index, custom_id, code, f"line {line_no}: {exc.message}"))
            continue
        seen.add(custom_id)
        out.lines.append(BatchLine(index, custom_id, body))
    return out


class _LineError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _custom_id(item: dict[str, Any], line_no: int, seen: set[str]) -> str:
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError("missing_custom_id", "'custom_id' (a non-empty string) is required")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise _LineError("invalid_custom_id", f"'custom_id' is longer than {MAX_CUSTOM_ID} characters")
    if custom_id in seen:
        raise _LineError("duplicate_custom_id", f"'custom_id' {custom_id!r} appears more than once")
    return custom_id


def _salvage_custom_id(line: str, seen: set[str]) -> str | None:
    """The custom_id of a line the strict parser refused, when plain JSON parsing still finds a
    clean, unused one (so the error line can be matched to its request)."""
    try:
        value = json.loads(line).get("custom_id")
    except (ValueError, RecursionError, AttributeError):
        return None
    if isinstance(value, str) and 0 < len(value) <= MAX_CUSTOM_ID and value not in seen and value.isprintable():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return value
    return None


def _request_body(item: dict[str, Any], endpoint: str) -> dict[str, Any]:
    method = item.get("method", "POST")
    if method != "POST":
        raise _LineError("invalid_method", f"'method' must be POST, got {method!r}")
    url = item.get("url")
    if url != endpoint:
        raise _LineError("mismatched_url", f"'url' must be the batch's endpoint {endpoint!r}, got {url!r}")
    body = item.get("body")
    if not isinstance(body, dict):
        raise _LineError("invalid_body", "'body' must be a JSON object")
    if body.get("stream"):
        raise _LineError("invalid_body", "streaming is not available in a batch ('stream' must be false)")
    return body


def _check_body(ctx: GatewayContext, body: dict[str, Any], endpoint: str) -> None:
    if endpoint == "/v1/chat/completions":
        req = parse_chat_request(body)
        ctx.model.check(req.model)
        prompts = [chat_prompt_ids(ctx, req)]
        param = "messages"
    else:
        req = parse_completion_request(body)
        ctx.model.check(req.model)
        prompts = completion_prompt_ids(ctx, req)
        param = "prompt"
    check_prompts_for_model(req.params, prompts, ctx.max_model_len, ctx.vocab_size, param=param)


def _rejected(index: int, custom_id: str, code: str, message: str) -> LineResult:
    return LineResult(index=index, custom_id=custom_id, ok=False, error_code=code, error_message=message)
