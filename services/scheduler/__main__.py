"""`python -m services.scheduler`: bind the frontend, backend and control sockets and serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

import uvloop

import zmq.asyncio

from common.kvstore_client import kvstore_addresses
from common.service_config import (
    add_service_arguments,
    addresses_from_args,
    default_run_dir,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from services.scheduler.kv_awareness import KvAwareness
from services.scheduler.pd_policy import make_policy
from services.scheduler.registry import DEFAULT_HEARTBEAT_TIMEOUT_S
from services.scheduler.server import SchedulerServer

logger = logging.getLogger("services.scheduler")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler", description="xllm global scheduler")
    add_service_arguments(parser)
    parser.add_argument("--heartbeat-timeout", type=float, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                        help="seconds without a heartbeat before an instance is declared dead")
    pd = parser.add_argument_group("P/D policy")
    pd.add_argument("--pd-policy", choices=("static", "dynamic"), default="static",
                    help="static: roles stay as started; dynamic: flip prefill/decode workers to meet the SLOs")
    pd.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="time-to-first-token target (ms)")
    pd.add_argument("--tpot-slo-ms", type=float, default=200.0, help="time-per-output-token target (ms)")
    pd.add_argument("--policy-interval", type=float, default=0.5, help="seconds between PD policy decisions")
    kv = parser.add_argument_group("KV-aware routing")
    kv.add_argument("--kvstore", action="store_true",
                    help="follow the kvstore of this --run-dir (its DRAM/SSD blocks count for routing)")
    kv.add_argument("--kvstore-addr", default=None, help="the kvstore's ROUTER address (implies --kvstore)")
    kv.add_argument("--kvstore-events-addr", default=None, help="the kvstore's event PUB address")
    return parser


async def _serve(args: argparse.Namespace) -> None:
    policy = make_policy(args.pd_policy, args.ttft_slo_ms / 1000.0, args.tpot_slo_ms / 1000.0)
    addresses = addresses_from_args(args, "scheduler")
    kv = None
    if args.kvstore or args.kvstore_addr:
        addr, events = kvstore_addresses(addresses.run_dir or default_run_dir())
        kv = KvAwareness(zmq.asyncio.Context.instance(), args.kvstore_addr or addr, args.kvstore_events_addr or events)
    server = SchedulerServer(
        addresses, heartbeat_timeout_s=args.heartbeat_timeout, policy=policy,
        policy_name=args.pd_policy, policy_interval_s=args.policy_interval, kv=kv,
    )
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
    for flag in ("heartbeat_timeout", "ttft_slo_ms", "tpot_slo_ms", "policy_interval"):
        if getattr(args, flag) <= 0:
            logger.error("--%s must be > 0", flag.replace("_", "-"))
            return 2
    try:
        uvloop.run(_serve(args))
    except OSError as exc:
        logger.error("scheduler cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())  # skips interpreter finalization once the scheduler shut down cleanly
