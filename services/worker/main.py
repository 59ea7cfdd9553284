"""Process entry of a worker: `python -m services.decode` / `python -m services.prefill`."""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvloop

from common.engine.config import EngineConfig
from common.service_config import (
    ServiceConfig,
    addresses_from_args,
    default_run_dir,
    parse_args_with_config,
    setup_logging,
)
from common.settings import from_namespace
from services.worker.config import WorkerConfig, build_parser
from services.worker.worker import Worker

__all__ = ["build_parser", "main"]

logger = logging.getLogger("services.worker")


async def _serve(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker.connect()
    await worker.run(stop)


def main(role: str, argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(role), argv)
    service, config = from_namespace(ServiceConfig, args), from_namespace(WorkerConfig, args)
    role = config.role or role
    instance_id = config.instance_id or f"{role}-{uuid.uuid4().hex[:8]}"
    setup_logging(service.log_level, f"worker {instance_id}")
    for problem in config.problems():
        logger.error("%s", problem)
        return 2

    from common.engine.engine import LLMEngine

    # The engine is built on the thread that will run its steps: each thread that enters
    # OpenMP gets its own thread team, and a second team idling beside the stepping one
    # costs ~40% of step time on a 2-core box (measured: 55 -> 85-110 ms per step).
    engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
    try:
        engine = engine_thread.submit(LLMEngine, from_namespace(EngineConfig, args)).result()
    except (ValueError, FileNotFoundError) as exc:
        # Bad flags or a missing model: one line rather than a traceback, and the usage-error
        # status so a supervisor does not restart it in a loop.
        logger.error("worker %s cannot load the engine: %s", instance_id, exc)
        return 2
    except OSError as exc:
        logger.error("worker %s cannot load the engine: %s", instance_id, exc)
        return 1
    kvstore = None
    addresses = addresses_from_args(service, "worker")
    if config.kvstore or config.kvstore_addr:
        from common.kvstore_client import KvStoreClient, kvstore_addresses

        addr = config.kvstore_addr or kvstore_addresses(addresses.run_dir or default_run_dir())[0]
        kvstore = KvStoreClient(addr, timeout_s=config.kvstore_timeout)
    worker = Worker(
        engine, addresses, instance_id, role=role, kv_addr=config.kv_addr,
        advertise_host=config.advertise_host, heartbeat_interval_s=config.heartbeat_interval,
        executor=engine_thread, transfer_timeout_s=config.kv_transfer_timeout, kvstore=kvstore,
        step_watchdog_s=config.step_watchdog_s,
    )
    try:
        uvloop.run(_serve(worker))
    except OSError as exc:
        logger.error("worker %s cannot start: %s", instance_id, exc)
        return 1
    return 0
