"""`python -m services.scheduler`: bind the frontend, backend and control sockets and serve."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

import zmq.asyncio

from common.kvstore_client import kvstore_addresses
from common.service_config import (
    ServiceConfig,
    addresses_from_args,
    default_run_dir,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from common.settings import from_namespace
from services.scheduler.config import SchedulerConfig, build_parser
from services.scheduler.kv_awareness import KvAwareness
from services.scheduler.server import SchedulerServer

logger = logging.getLogger("services.scheduler")


async def _serve(service: ServiceConfig, config: SchedulerConfig) -> None:
    addresses = addresses_from_args(service, "scheduler")
    kv = None
    if config.kvstore or config.kvstore_addr:
        addr, events = kvstore_addresses(addresses.run_dir or default_run_dir())
        kv = KvAwareness(zmq.asyncio.Context.instance(), config.kvstore_addr or addr,
                         config.kvstore_events_addr or events)
    server = SchedulerServer(addresses, config, kv=kv)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.bind()
    await server.serve(stop)
    logger.info("scheduler stopped")


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    service, config = from_namespace(ServiceConfig, args), from_namespace(SchedulerConfig, args)
    setup_logging(service.log_level, "scheduler")
    for problem in config.problems():
        logger.error("%s", problem)
        return 2
    try:
        uvloop.run(_serve(service, config))
    except OSError as exc:
        logger.error("scheduler cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())  # skips interpreter finalization once the scheduler shut down cleanly
