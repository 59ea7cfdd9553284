"""The Batch API's HTTP handlers: `/v1/files` and `/v1/batches`, in OpenAI's shapes."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from aiohttp import web

from services.gateway.batch.records import ENDPOINTS, TERMINAL_STATUSES, BatchRecord, FileRecord
from services.gateway.batch.runner import BatchRunner
from services.gateway.context import CTX_KEY
from services.gateway.httpio import json_response, read_json
from services.gateway.openai_schema import APIError, bad_request

__all__ = ["RUNNER_KEY", "MAX_FILE_BYTES_KEY", "add_routes"]

RUNNER_KEY: web.AppKey[BatchRunner] = web.AppKey("batch_runner", BatchRunner)
MAX_FILE_BYTES_KEY: web.AppKey[int] = web.AppKey("batch_max_file_bytes", int)

# OpenAI takes only "24h"; shorter windows (an xllm extension: "90s", "30m", "2h", "1d") make
# expiry testable and let an operator bound a job.
_WINDOW = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 7 * 86400
MAX_METADATA_KEYS = 16


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", get_file)
    app.router.add_get("/v1/files/{file_id}/content", get_file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", get_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)


def _not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"no {kind} with id {ident!r}", param="id", code="not_found")


# ------------------------------------------------------------------------------------- files


async def upload_file(request: web.Request) -> web.Response:
    runner, limit = request.app[RUNNER_KEY], request.app[MAX_FILE_BYTES_KEY]
    if request.content_length is not None and request.content_length > limit + 64 * 1024:
        raise _too_large(limit)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise bad_request("upload the file as multipart/form-data with the fields 'purpose' and 'file'",
                          param="file", code="invalid_type") from None
    purpose, filename, data = None, None, None
    while (part := await reader.next()) is not None:
        if part.name == "purpose":
            purpose = (await part.text()).strip()
        elif part.name == "file":
            filename = part.filename or "upload.jsonl"
            chunks, size = [], 0
            while chunk := await part.read_chunk(64 * 1024):
                size += len(chunk)
                if size > limit:
                    raise _too_large(limit)
                chunks.append(chunk)
            data = b"".join(chunks)
    if data is None:
        raise bad_request("the 'file' field is missing", param="file", code="missing_required_parameter")
    if purpose != "batch":
        raise bad_request(f"'purpose' must be 'batch' (the only purpose this server stores), got {purpose!r}",
                          param="purpose")
    record = FileRecord(id=f"file-{uuid.uuid4().hex}", filename=filename or "upload.jsonl", purpose=purpose,
                        bytes=len(data), created_at=int(time.time()))
    await request.loop.run_in_executor(None, runner.store.put_file, record, data)
    return json_response(record.as_openai())


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the file is larger than the limit of {limit} bytes", param="file",
                    code="file_too_large")


def _file(request: web.Request) -> FileRecord:
    file_id = request.match_info["file_id"]
    record = request.app[RUNNER_KEY].store.get_file(file_id)
    if record is None:
        raise _not_found("file", file_id)
    return record


async def list_files(request: web.Request) -> web.Response:
    purpose = request.query.get("purpose")
    files = [f for f in request.app[RUNNER_KEY].store.list_files() if purpose is None or f.purpose == purpose]
    files.sort(key=lambda f: f.created_at, reverse=True)
    return json_response({"object": "list", "data": [f.as_openai() for f in files], "has_more": False})


async def get_file(request: web.Request) -> web.Response:
    return json_response(_file(request).as_openai())


async def get_file_content(request: web.Request) -> web.Response:
    record = _file(request)
    content = request.app[RUNNER_KEY].file_content(record)
    if content is None:
        raise _not_found("file content", record.id)
    return web.Response(body=content, content_type="application/jsonl" if record.filename.endswith(".jsonl")
                        else "application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    record = _file(request)
    store = request.app[RUNNER_KEY].store
    in_use = [b.id for b in store.list_batches() if b.input_file_id == record.id and b.status not in TERMINAL_STATUSES]
    if in_use:
        raise bad_request(f"the file is the input of batch {in_use[0]}, which is still running", param="file_id")
    store.delete_file(record.id)
    return json_response({"id": record.id, "object": "file", "deleted": True})


# ----------------------------------------------------------------------------------- batches


def _window_seconds(value: Any) -> int:
    match = _WINDOW.match(value) if isinstance(value, str) else None
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise bad_request("'completion_window' must be a duration such as '24h' (or '90s', '30m', '2d'; at most 7d)",
                          param="completion_window")
    return seconds


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if (not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())):
        raise bad_request(f"'metadata' must be an object of at most {MAX_METADATA_KEYS} string values",
                          param="metadata")
    return value


async def create_batch(request: web.Request) -> web.Response:
    ctx, runner = request.app[CTX_KEY], request.app[RUNNER_KEY]
    body = await read_json(request, ctx.max_body_bytes)
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise bad_request(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", param="endpoint")
    window = body.get("completion_window", "24h")
    seconds = _window_seconds(window)
    file_id = body.get("input_file_id")
    record = runner.store.get_file(file_id) if isinstance(file_id, str) else None
    if record is None or record.batch_id is not None:
        raise bad_request(f"no uploaded batch input file with id {file_id!r}", param="input_file_id",
                          code="not_found")
    now = int(time.time())
    batch = BatchRecord(id=f"batch_{uuid.uuid4().hex}", endpoint=endpoint, input_file_id=record.id,
                        completion_window=window, status="validating", created_at=now, expires_at=now + seconds,
                        metadata=_metadata(body.get("metadata")))
    runner.store.put_batch(batch)
    runner.launch(batch.id)
    return json_response(batch.as_openai())


def _batch(request: web.Request) -> BatchRecord:
    batch_id = request.match_info["batch_id"]
    batch = request.app[RUNNER_KEY].store.get_batch(batch_id)
    if batch is None:
        raise _not_found("batch", batch_id)
    return batch


async def get_batch(request: web.Request) -> web.Response:
    return json_response(_batch(request).as_openai())


async def list_batches(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise bad_request("'limit' must be an integer from 1 to 100", param="limit")
    batches = sorted(request.app[RUNNER_KEY].store.list_batches(), key=lambda b: (b.created_at, b.id),
                     reverse=True)
    after = request.query.get("after")
    if after is not None:
        ids = [b.id for b in batches]
        batches = batches[ids.index(after) + 1:] if after in ids else []
    page = batches[:limit]
    return json_response({"object": "list", "data": [b.as_openai() for b in page],
                          "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                          "has_more": len(batches) > limit})


async def cancel_batch(request: web.Request) -> web.Response:
    batch = request.app[RUNNER_KEY].cancel(_batch(request).id)
    assert batch is not None
    return json_response(batch.as_openai())
