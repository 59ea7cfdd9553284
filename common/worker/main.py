"""Process entry of a worker: `python -m services.decode` / `python -m services.prefill`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvloop

from common.service_config import (
    add_service_arguments,
    addresses_from_args,
    parse_args_with_config,
    setup_logging,
)
from common.worker.worker import DEFAULT_HEARTBEAT_INTERVAL_S, ROLES, Worker

__all__ = ["build_parser", "main"]

logger = logging.getLogger("common.worker")


def build_parser(role: str) -> argparse.ArgumentParser:
    from common.cli import add_engine_arguments  # argparse only; keeps one definition of the engine flags

    parser = argparse.ArgumentParser(prog=f"python -m services.{role}", description=f"xllm worker ({role} role)")
    add_engine_arguments(parser)
    add_service_arguments(parser)
    w = parser.add_argument_group("worker")
    w.add_argument("--instance-id", default=None, help="this worker's id (default: generated)")
    w.add_argument("--role", default=role, choices=ROLES, help=f"recorded role (default: {role})")
    w.add_argument("--kv-addr", default=None, help="address of the kv ROUTER (default: from --run-dir)")
    w.add_argument("--advertise-host", default=None,
                   help="host peers use to reach a tcp kv socket (default: the hostname when bound on 0.0.0.0)")
    w.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL_S,
                   help="seconds between heartbeats")
    return parser


async def _serve(worker: Worker) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker.connect()
    await worker.run(stop)


def main(role: str, argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(role), argv)
    instance_id = args.instance_id or f"{args.role}-{uuid.uuid4().hex[:8]}"
    setup_logging(args.log_level, f"worker {instance_id}")
    if args.heartbeat_interval <= 0:
        logger.error("--heartbeat-interval must be > 0")
        return 2

    from common.cli import engine_config_from_args
    from common.engine.engine import LLMEngine

    # The engine is built on the thread that will run its steps: each thread that enters
    # OpenMP gets its own thread team, and a second team idling beside the stepping one
    # costs ~40% of step time on a 2-core box (measured: 55 -> 85-110 ms per step).
    engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
    try:
        engine = engine_thread.submit(LLMEngine, engine_config_from_args(args)).result()
    except (ValueError, FileNotFoundError) as exc:
        # Bad flags or a missing model: one line rather than a traceback, and the usage-error
        # status so a supervisor does not restart it in a loop.
        logger.error("worker %s cannot load the engine: %s", instance_id, exc)
        return 2
    except OSError as exc:
        logger.error("worker %s cannot load the engine: %s", instance_id, exc)
        return 1
    worker = Worker(
        engine, addresses_from_args(args, "worker"), instance_id, role=args.role, kv_addr=args.kv_addr,
        advertise_host=args.advertise_host, heartbeat_interval_s=args.heartbeat_interval,
        executor=engine_thread,
    )
    try:
        uvloop.run(_serve(worker))
    except OSError as exc:
        logger.error("worker %s cannot start: %s", instance_id, exc)
        return 1
    return 0
