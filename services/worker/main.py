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
    default_run_dir,
    parse_args_with_config,
    setup_logging,
)
from services.prefill.kv_sender import DEFAULT_TRANSFER_TIMEOUT_S
from services.worker.worker import DEFAULT_HEARTBEAT_INTERVAL_S, ROLES, Worker

__all__ = ["build_parser", "main"]

logger = logging.getLogger("services.worker")


def build_parser(role: str) -> argparse.ArgumentParser:
    from xllm.cli import add_engine_arguments  # argparse only; keeps one definition of the engine flags

    parser = argparse.ArgumentParser(prog=f"python -m services.{role}", description=f"xllm worker ({role} role)")
    add_engine_arguments(parser)
    add_service_arguments(parser)
    w = parser.add_argument_group("worker")
    w.add_argument("--instance-id", default=None, help="this worker's id (default: generated)")
    w.add_argument("--role", default=role, choices=ROLES, help=f"starting role (default: {role}); the scheduler may flip it")
    w.add_argument("--kv-addr", default=None, help="address of the kv ROUTER (default: from --run-dir)")
    w.add_argument("--advertise-host", default=None,
                   help="host peers use to reach a tcp kv socket (default: the hostname when bound on 0.0.0.0)")
    w.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL_S,
                   help="seconds between heartbeats")
    w.add_argument("--kv-transfer-timeout", type=float, default=DEFAULT_TRANSFER_TIMEOUT_S,
                   help="seconds to wait on a decode peer during a KV hand-off before trying the next one")
    w.add_argument("--kvstore", action="store_true",
                   help="offload evicted KV pages to the kvstore of this --run-dir and reload prefix hits from it")
    w.add_argument("--kvstore-addr", default=None, help="the kvstore's ROUTER address (implies --kvstore)")
    w.add_argument("--kvstore-timeout", type=float, default=0.25,
                   help="seconds an admission waits for the kvstore before computing the prefix itself")
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
    if args.heartbeat_interval <= 0 or args.kv_transfer_timeout <= 0:
        logger.error("--heartbeat-interval and --kv-transfer-timeout must be > 0")
        return 2

    from xllm.cli import engine_config_from_args
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
    kvstore = None
    if args.kvstore or args.kvstore_addr:
        from common.kvstore_client import KvStoreClient, kvstore_addresses

        addresses = addresses_from_args(args, "worker")
        addr = args.kvstore_addr or kvstore_addresses(addresses.run_dir or default_run_dir())[0]
        kvstore = KvStoreClient(addr, timeout_s=args.kvstore_timeout)
    worker = Worker(
        engine, addresses_from_args(args, "worker"), instance_id, role=args.role, kv_addr=args.kv_addr,
        advertise_host=args.advertise_host, heartbeat_interval_s=args.heartbeat_interval,
        executor=engine_thread, transfer_timeout_s=args.kv_transfer_timeout, kvstore=kvstore,
    )
    try:
        uvloop.run(_serve(worker))
    except OSError as exc:
        logger.error("worker %s cannot start: %s", instance_id, exc)
        return 1
    return 0
