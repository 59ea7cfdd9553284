"""The OpenAI Batch API: uploaded JSONL files run as offline work, persisted in LMDB.

`store` keeps files, batches and per-line results; `validate` checks an input file line by line;
`runner` runs each batch's lines as offline-priority requests under the `throttle`; `api` holds
the HTTP handlers. `setup_batch_api` wires it all onto the gateway's application.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from aiohttp import web

from services.gateway.batch.api import MAX_FILE_BYTES_KEY, RUNNER_KEY, add_routes
from services.gateway.batch.metrics import OfflineCollector
from services.gateway.batch.runner import BatchRunner
from services.gateway.batch.store import BatchStore
from services.gateway.batch.throttle import OfflineThrottle
from services.gateway.context import GatewayContext

__all__ = ["setup_batch_api", "default_batch_dir", "RUNNER_KEY"]

logger = logging.getLogger(__name__)


def default_batch_dir(run_dir: str | None) -> str:
    """Beside the ipc sockets on one box (so a restarted gateway finds its batches), else the
    user's state directory."""
    if run_dir:
        return str(Path(run_dir) / "batches")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(state) / "xllm" / "batches")


def self_url(host: str, port: int) -> str:
    """Where this gateway reaches its own HTTP endpoint (a wildcard bind is reached on loopback)."""
    if host in ("", "0.0.0.0", "::", "*"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def setup_batch_api(app: web.Application, ctx: GatewayContext, *, batch_dir: str, url: str, api_key: str | None,
                    max_file_bytes: int, max_offline_in_flight: int, tpot_target_s: float) -> BatchRunner:
    store = BatchStore(batch_dir)
    runner_ref: list[BatchRunner] = []

    def online_in_flight() -> int:
        return max(0, ctx.admission.in_flight - runner_ref[0].throttle.in_flight)

    throttle = OfflineThrottle(max_offline_in_flight, tpot_target_s, online_in_flight)
    runner = BatchRunner(ctx, store, url, api_key, throttle)
    runner_ref.append(runner)
    app[RUNNER_KEY] = runner
    app[MAX_FILE_BYTES_KEY] = max_file_bytes
    add_routes(app)
    ctx.metrics.registry.register(OfflineCollector(runner))

    async def start(_app: web.Application) -> None:
        await runner.start()
        logger.info("batch API on: %s (offline requests in flight <= %d)", batch_dir, max_offline_in_flight)

    async def stop(_app: web.Application) -> None:
        await runner.close()
        store.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return runner
