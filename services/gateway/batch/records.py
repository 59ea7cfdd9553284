"""The Batch API's persisted records: uploaded files, batches and per-line results (msgspec structs).

They are stored as msgpack in LMDB (`store.py`) and shown to clients as OpenAI JSON objects
(`as_openai`). Times are Unix seconds, as OpenAI's objects carry them.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["FileRecord", "BatchRecord", "LineResult", "BATCH_STATUSES", "TERMINAL_STATUSES", "ENDPOINTS"]

# validating -> in_progress -> finalizing -> completed; or failed / expired / cancelling -> cancelled
BATCH_STATUSES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                  "cancelled")
TERMINAL_STATUSES = frozenset(("failed", "completed", "expired", "cancelled"))
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class FileRecord(msgspec.Struct, kw_only=True):
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    # A batch's output or error file has no stored content: it is read from the batch's results.
    batch_id: str | None = None
    results_kind: str | None = None  # "output" | "error"

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


class BatchRecord(msgspec.Struct, kw_only=True):
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = []  # whole-file problems (the batch then fails)
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def finished_lines(self) -> int:
        return self.completed + self.failed

    def as_openai(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at, "failed_at": self.failed_at,
            "expired_at": self.expired_at, "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


class LineResult(msgspec.Struct, kw_only=True):
    """One input line's outcome, committed (with the batch's counts) before it counts as done."""

    index: int
    custom_id: str
    ok: bool
    status_code: int | None = None  # the HTTP status of the request, when it ran
    body: dict[str, Any] | None = None  # the response body, when it ran
    error_code: str | None = None  # why it did not run (validation, expiry, cancellation)
    error_message: str | None = None
    request_id: str = ""

    def as_openai_line(self) -> dict[str, Any]:
        response = (None if self.status_code is None else
                    {"status_code": self.status_code, "request_id": self.request_id, "body": self.body})
        error = (None if self.error_code is None else {"code": self.error_code, "message": self.error_message})
        return {"id": f"batch_req_{self.request_id or self.index}", "custom_id": self.custom_id,
                "response": response, "error": error}
