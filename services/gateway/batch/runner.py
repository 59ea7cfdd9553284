"""Running batches: validate, dispatch each line as an offline request, commit, finalize.

Each line runs through this gateway's own HTTP endpoint on loopback, with `priority: offline`:
a batch line is then served by exactly the code an online request is (parsing, chat template,
tools, structured outputs, migration), and its response body is what the client would have
received. Lines are dispatched under the `OfflineThrottle`; a line that meets a transient refusal
(429/503: queue full, no worker yet) or a lost connection is retried until the batch expires,
a line the server rejects (4xx) or fails past `MAX_ATTEMPTS` is recorded as failed.

Crash safety: a line counts only once its result is committed (`BatchStore.commit_result`), so a
gateway killed at any instant restarts with `resume()` and runs exactly the lines without one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import aiohttp

from services.gateway.batch.records import TERMINAL_STATUSES, BatchRecord, FileRecord, LineResult
from services.gateway.batch.store import BatchStore
from services.gateway.batch.throttle import OfflineThrottle
from services.gateway.batch.validate import BatchLine, validate_input
from services.gateway.context import GatewayContext

logger = logging.getLogger(__name__)

__all__ = ["BatchRunner"]

MAX_ATTEMPTS = 3  # server errors (5xx other than 503) before a line is recorded as failed
_RETRY_S = (0.2, 0.5, 1.0, 2.0)


class BatchRunner:
    def __init__(self, ctx: GatewayContext, store: BatchStore, self_url: str, api_key: str | None,
                 throttle: OfflineThrottle) -> None:
        self.ctx = ctx
        self.store = store
        self.self_url = self_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.throttle = throttle
        self.tokens_generated = 0
        self._started = time.monotonic()
        self._tasks: dict[str, asyncio.Task] = {}
        self._session: aiohttp.ClientSession | None = None

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))
        self.resume()

    def resume(self) -> None:
        """Pick up every batch a previous run of the gateway left unfinished."""
        for batch in self.store.list_batches():
            if batch.status not in TERMINAL_STATUSES:
                logger.info("resuming batch %s (%s, %d/%d lines done)", batch.id, batch.status,
                            batch.finished_lines, batch.total)
                self.launch(batch.id)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if self._session is not None:
            await self._session.close()

    def launch(self, batch_id: str) -> None:
        if batch_id not in self._tasks:
            task = asyncio.create_task(self._run(batch_id), name=f"batch-{batch_id}")
            self._tasks[batch_id] = task
            task.add_done_callback(lambda _t: self._tasks.pop(batch_id, None))

    def cancel(self, batch_id: str) -> BatchRecord | None:
        batch = self.store.get_batch(batch_id)
        if batch is None or batch.status in TERMINAL_STATUSES or batch.status == "cancelling":
            return batch
        batch.status, batch.cancelling_at = "cancelling", int(time.time())
        self.store.put_batch(batch)
        self.launch(batch_id)  # a running batch notices; one not running yet finishes the cancel
        return batch

    # ---- one batch ------------------------------------------------------------------------

    async def _run(self, batch_id: str) -> None:
        try:
            batch = self.store.get_batch(batch_id)
            if batch is None:
                return
            data = self.store.file_data(batch.input_file_id) or b""
            loop = asyncio.get_running_loop()
            checked = await loop.run_in_executor(None, validate_input, self.ctx, data, batch.endpoint)
            if batch.status == "validating":
                batch = self._start_batch(batch, checked)
            if batch.status == "in_progress":
                done = self.store.finished_indices(batch_id)
                await self._dispatch(batch_id, [line for line in checked.lines if line.index not in done])
            self._finish(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("batch %s stopped by an internal error", batch_id)
            batch = self.store.get_batch(batch_id)
            if batch is not None and batch.status not in TERMINAL_STATUSES:
                batch.errors = [*batch.errors, {"code": "internal_error", "message": "the batch runner failed",
                                                "param": None, "line": None}]
                batch.status, batch.failed_at = "failed", int(time.time())
                self.store.put_batch(batch)

    def _start_batch(self, batch: BatchRecord, checked) -> BatchRecord:
        now = int(time.time())
        if checked.file_errors:
            batch.errors, batch.status, batch.failed_at = checked.file_errors, "failed", now
            self.store.put_batch(batch)
            return batch
        batch.total, batch.status, batch.in_progress_at = checked.total, "in_progress", now
        self.store.put_batch(batch)
        for rejected in checked.rejected:
            self.store.commit_result(batch.id, rejected)
        return self.store.get_batch(batch.id) or batch

    async def _dispatch(self, batch_id: str, lines: list[BatchLine]) -> None:
        running: set[asyncio.Task] = set()
        try:
            for line in lines:
                if not await self.throttle.acquire(stop=lambda: self._stopping(batch_id)):
                    break
                task = asyncio.create_task(self._run_line(batch_id, line))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                if self._stopping(batch_id):
                    for task in running:
                        task.cancel()
                await asyncio.wait(running, timeout=0.5)
        finally:
            for task in running:
                task.cancel()

    def _stopping(self, batch_id: str) -> bool:
        batch = self.store.get_batch(batch_id)
        return batch is None or batch.status != "in_progress" or time.time() >= batch.expires_at

    async def _run_line(self, batch_id: str, line: BatchLine) -> None:
        seconds_per_token: float | None = None
        try:
            result, seconds_per_token = await self._execute(batch_id, line)
            if result is not None:
                self.store.commit_result(batch_id, result)
        finally:
            self.throttle.release(seconds_per_token)

    async def _execute(self, batch_id: str, line: BatchLine) -> tuple[LineResult | None, float | None]:
        batch = self.store.get_batch(batch_id)
        assert batch is not None and self._session is not None
        body = {**line.body, "priority": "offline", "stream": False}
        url = self.self_url + batch.endpoint
        failures = attempt = 0
        while not self._stopping(batch_id):
            started = time.monotonic()
            try:
                async with self._session.post(url, json=body, headers=self.headers) as resp:
                    payload: Any = await resp.json(content_type=None)
                    status = resp.status
            except (aiohttp.ClientError, ValueError, asyncio.TimeoutError) as exc:
                logger.debug("batch %s line %s: %r (retrying)", batch_id, line.custom_id, exc)
                status, payload = None, None
            if status is not None and status >= 500 and status != 503:
                failures += 1
            if status is None or status in (429, 503) or (status >= 500 and failures < MAX_ATTEMPTS):
                await asyncio.sleep(_RETRY_S[min(attempt, len(_RETRY_S) - 1)])
                attempt += 1
                continue
            ok = status == 200
            per_token = None
            if ok and isinstance(payload, dict):
                tokens = (payload.get("usage") or {}).get("completion_tokens") or 0
                self.tokens_generated += tokens
                if tokens:
                    per_token = (time.monotonic() - started) / tokens
            request_id = payload.get("id", "") if isinstance(payload, dict) else ""
            return LineResult(index=line.index, custom_id=line.custom_id, ok=ok, status_code=status,
                              body=payload if isinstance(payload, dict) else {"raw": str(payload)},
                              request_id=str(request_id) or uuid.uuid4().hex), per_token
        return None, None

    def _finish(self, batch_id: str) -> None:
        """Expired, cancelled or done: write the ending and the output/error files."""
        batch = self.store.get_batch(batch_id)
        if batch is None or batch.status in TERMINAL_STATUSES:
            return
        now = int(time.time())
        if batch.status == "in_progress" and now >= batch.expires_at:
            done = self.store.finished_indices(batch_id)
            checked = validate_input(self.ctx, self.store.file_data(batch.input_file_id) or b"", batch.endpoint)
            for line in checked.lines:
                if line.index not in done:
                    self.store.commit_result(batch_id, LineResult(
                        index=line.index, custom_id=line.custom_id, ok=False, error_code="batch_expired",
                        error_message="the batch expired before this request could run"))
            batch = self.store.get_batch(batch_id) or batch
            ending = "expired"
        elif batch.status == "cancelling":
            ending = "cancelled"
        else:
            batch.status, batch.finalizing_at = "finalizing", now
            self.store.put_batch(batch)
            ending = "completed"
        self._write_result_files(batch)
        batch.status = ending
        setattr(batch, f"{ending}_at", int(time.time()))
        self.store.put_batch(batch)
        logger.info("batch %s %s: %d completed, %d failed of %d", batch.id, ending, batch.completed,
                    batch.failed, batch.total)

    def _write_result_files(self, batch: BatchRecord) -> None:
        now = int(time.time())
        for kind, count in (("output", batch.completed), ("error", batch.failed)):
            if not count:
                continue
            size = sum(len(self.render_line(r)) for r in self.store.results(batch.id) if r.ok == (kind == "output"))
            record = FileRecord(id=f"file-{uuid.uuid4().hex}", filename=f"{batch.id}_{kind}.jsonl",
                                purpose=f"batch_{kind}", bytes=size, created_at=now, batch_id=batch.id,
                                results_kind=kind)
            self.store.put_file(record, None)
            setattr(batch, f"{kind}_file_id", record.id)

    @staticmethod
    def render_line(result: LineResult) -> bytes:
        import json

        return (json.dumps(result.as_openai_line(), ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def file_content(self, record: FileRecord) -> bytes | None:
        if record.batch_id is None:
            return self.store.file_data(record.id)
        want_ok = record.results_kind == "output"
        return b"".join(self.render_line(r) for r in list(self.store.results(record.batch_id)) if r.ok == want_ok)

    def describe(self) -> dict:
        batches = self.store.list_batches()
        active = [b for b in batches if b.status not in TERMINAL_STATUSES]
        elapsed = max(1e-9, time.monotonic() - self._started)
        return {"active": [{"id": b.id, "status": b.status, "total": b.total, "completed": b.completed,
                            "failed": b.failed} for b in active],
                "offline_in_flight": self.throttle.in_flight, "throttle": self.throttle.describe(),
                "offline_tokens_total": self.tokens_generated,
                "offline_tokens_per_s": round(self.tokens_generated / elapsed, 2)}
