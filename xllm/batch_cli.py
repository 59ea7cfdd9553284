"""`xllm batch submit | status | results | cancel`: the Batch API from the command line.

A thin client of a running server's `/v1/files` and `/v1/batches` (aiohttp), with a progress bar
(tqdm, on stderr) while it waits for a batch to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp

__all__ = ["add_batch_commands"]

TERMINAL = frozenset(("failed", "completed", "expired", "cancelled"))


class BatchClient:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    async def __aenter__(self) -> BatchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(method, self.url + path, headers=self.headers, **kwargs) as resp:
            body = await resp.read()
            if resp.status != 200:
                try:
                    message = json.loads(body)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = body.decode(errors="replace")[:500]
                raise SystemExit(f"xllm batch: {method} {path} failed with {resp.status}: {message}")
            return json.loads(body) if resp.content_type == "application/json" else body

    async def wait(self, batch_id: str, progress: bool) -> dict:
        from tqdm import tqdm

        bar = None
        try:
            while True:
                batch = await self.call("GET", f"/v1/batches/{batch_id}")
                counts = batch["request_counts"]
                if progress and bar is None and counts["total"]:
                    bar = tqdm(total=counts["total"], unit="req", desc=batch_id[:18], file=sys.stderr)
                if bar is not None:
                    bar.n = counts["completed"] + counts["failed"]
                    bar.set_postfix(status=batch["status"], failed=counts["failed"], refresh=False)
                    bar.refresh()
                if batch["status"] in TERMINAL:
                    return batch
                await asyncio.sleep(1.0)
        finally:
            if bar is not None:
                bar.close()


def _endpoint_of(path: Path) -> str:
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)["url"]
                except (ValueError, KeyError, TypeError):
                    break
    raise SystemExit(f"xllm batch: cannot tell the endpoint from the first line of {path}: pass --endpoint")


async def _submit(args: argparse.Namespace) -> int:
    path = Path(args.file)
    endpoint = args.endpoint or _endpoint_of(path)
    async with BatchClient(args.url, args.api_key) as client:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", path.read_bytes(), filename=path.name, content_type="application/jsonl")
        uploaded = await client.call("POST", "/v1/files", data=form)
        batch = await client.call("POST", "/v1/batches", json={
            "input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": args.completion_window})
        print(batch["id"])
        if args.wait:
            batch = await client.wait(batch["id"], progress=not args.no_progress)
            print(json.dumps(batch["request_counts"] | {"status": batch["status"]}))
            return 0 if batch["status"] == "completed" else 1
    return 0


async def _status(args: argparse.Namespace) -> int:
    async with BatchClient(args.url, args.api_key) as client:
        batch = (await client.wait(args.batch_id, progress=not args.no_progress) if args.wait
                 else await client.call("GET", f"/v1/batches/{args.batch_id}"))
    print(json.dumps(batch, indent=2))
    return 0


async def _results(args: argparse.Namespace) -> int:
    async with BatchClient(args.url, args.api_key) as client:
        batch = (await client.wait(args.batch_id, progress=not args.no_progress) if args.wait
                 else await client.call("GET", f"/v1/batches/{args.batch_id}"))
        for file_id, target in ((batch.get("output_file_id"), args.output), (batch.get("error_file_id"), args.errors)):
            if file_id is None:
                continue
            content = await client.call("GET", f"/v1/files/{file_id}/content")
            if target in (None, "-"):
                sys.stdout.write(content.decode())
            else:
                Path(target).write_bytes(content)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    async with BatchClient(args.url, args.api_key) as client:
        batch = await client.call("POST", f"/v1/batches/{args.batch_id}/cancel")
    print(batch["status"])
    return 0


def add_batch_commands(sub: Any) -> None:
    batch = sub.add_parser("batch", help="submit and follow OpenAI Batch API jobs on a running server")
    batch_sub = batch.add_subparsers(dest="batch_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
        p.add_argument("--api-key", default=os.environ.get("XLLM_API_KEY"), help="(env XLLM_API_KEY)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar while waiting")

    submit = batch_sub.add_parser("submit", help="upload a JSONL file and start a batch (prints its id)")
    submit.add_argument("file", help="JSONL: one {custom_id, method, url, body} per line")
    submit.add_argument("--endpoint", default=None, help="default: the first line's url")
    submit.add_argument("--completion-window", default="24h")
    submit.add_argument("--wait", action="store_true", help="wait for the batch to end, with a progress bar")
    common(submit)
    submit.set_defaults(func=lambda a: asyncio.run(_submit(a)))
    for name, handler, summary in (("status", _status, "print a batch"),
                                   ("results", _results, "write a batch's output (and error) lines"),
                                   ("cancel", _cancel, "cancel a batch")):
        cmd = batch_sub.add_parser(name, help=summary)
        cmd.add_argument("batch_id")
        if name != "cancel":
            cmd.add_argument("--wait", action="store_true", help="wait for the batch to end first")
        if name == "results":
            cmd.add_argument("--output", "-o", default=None, help="output lines to this file (default: stdout)")
            cmd.add_argument("--errors", default=None, help="error lines to this file (default: stdout)")
        common(cmd)
        cmd.set_defaults(func=lambda a, h=handler: asyncio.run(h(a)))
