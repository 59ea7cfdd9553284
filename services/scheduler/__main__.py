"""`python -m services.scheduler`: bind the frontend, backend and control sockets and serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvloop

from common.service_config import (
    add_service_arguments,
    addresses_from_args,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from services.scheduler.registry import DEFAULT_HEARTBEAT_TIMEOUT_S
from services.scheduler.server import SchedulerServer

logger = logging.getLogger("services.scheduler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description="xllm global scheduler")
    add_service_arguments(parser)
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                        help="seconds without a heartbeat before an instance is declared dead")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    server = SchedulerServer(addresses_from_args(args, "scheduler"), heartbeat_timeout_s=args.heartbeat_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.bind()
    await server.serve(stop)
    logger.info("scheduler stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    setup_logging(args.log_level, "scheduler")
    if args.heartbeat_timeout <= 0:
        logger.error("--heartbeat-timeout must be > 0")
        return 2
    try:
        uvloop.run(_serve(args))
    except OSError as exc:
        logger.error("scheduler cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())  # skips interpreter finalization once the scheduler shut down cleanly
