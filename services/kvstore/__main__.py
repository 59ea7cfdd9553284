"""`python -m services.kvstore`: the tiered KV block store (DRAM + LMDB on SSD) as a service.

    python -m services.kvstore --dir /var/lib/xllm/kv --dram-bytes 4GiB --ssd-bytes 100GiB \
        [--run-dir DIR | --addr ADDR --events-addr ADDR] [--log-level INFO]

Addresses default to `kvstore.sock` / `kvstore-events.sock` in the run dir (see
`common.kvstore_client.kvstore_addresses`), so workers and the scheduler find it the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal

import lmdb
import uvloop

from common.codec import DEFAULT_MAX_MESSAGE_BYTES
from common.kvstore_client import kvstore_addresses
from common.service_config import (
    add_service_arguments,
    addresses_from_args,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from services.kvstore.server import KvStoreServer
from services.kvstore.ssd_tier import DirectoryInUse
from services.kvstore.store import KvStore

logger = logging.getLogger("services.kvstore")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """`1073741824`, `512MiB`, `4GiB`, `1.5GB` -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 4GiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.kvstore", description="xllm tiered KV store")
    add_service_arguments(parser)
    g = parser.add_argument_group("kvstore")
    g.add_argument("--dir", required=True, help="directory of the SSD tier (LMDB); survives restarts")
    g.add_argument("--dram-bytes", type=parse_bytes, default=parse_bytes("1GiB"), help="DRAM tier budget (1GiB)")
    g.add_argument("--ssd-bytes", type=parse_bytes, default=parse_bytes("16GiB"), help="SSD tier budget (16GiB)")
    g.add_argument("--addr", default=None, help="request ROUTER address (default: <run-dir>/kvstore.sock)")
    g.add_argument("--events-addr", default=None, help="event PUB address (default: <run-dir>/kvstore-events.sock)")
    g.add_argument("--source-id", default="kvstore", help="`source` of its events and PUB topic (kvstore)")
    g.add_argument("--max-block-bytes", type=parse_bytes, default=parse_bytes("16MiB"),
                   help="largest block accepted (16MiB)")
    g.add_argument("--max-message-bytes", type=parse_bytes, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest bus message (64MiB); clients must use the same")
    g.add_argument("--writebehind-bytes", type=parse_bytes, default=parse_bytes("256MiB"),
                   help="DRAM evictions waiting for the SSD beyond this are dropped (256MiB)")
    g.add_argument("--no-sync", action="store_true",
                   help="no fsync per LMDB commit: survives a process crash, not a power loss")
    g.add_argument("--namespace", action="append", default=None,
                   help="serve only this namespace (repeatable; default: any)")
    return parser


async def _serve(args: argparse.Namespace, store: KvStore, addr: str, events_addr: str) -> None:
    addresses = addresses_from_args(args, "kvstore")
    server = KvStoreServer(
        store, addr, events_addr, source=args.source_id, max_block_bytes=args.max_block_bytes,
        max_message_bytes=args.max_message_bytes,
        allowed_namespaces=set(args.namespace) if args.namespace else None, curve=addresses.curve,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.bind()
    await server.serve(stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    setup_logging(args.log_level, "kvstore")
    addr, events_addr = args.addr, args.events_addr
    if addr is None or events_addr is None:
        run_dir = addresses_from_args(args, "kvstore").run_dir
        if run_dir is None:
            logger.error("give --addr and --events-addr, or --run-dir")
            return 2
        default_addr, default_events = kvstore_addresses(run_dir)
        addr, events_addr = addr or default_addr, events_addr or default_events
    if args.dram_bytes < 0 or args.ssd_bytes < 0 or args.max_block_bytes <= 0:
        logger.error("sizes must be positive")
        return 2
    try:
        store = KvStore(args.dir, args.dram_bytes, args.ssd_bytes, writebehind_bytes=args.writebehind_bytes,
                        sync=not args.no_sync)
    except (DirectoryInUse, OSError, lmdb.Error) as exc:
        logger.error("kvstore cannot open %s: %s", args.dir, exc)
        return 1
    try:
        uvloop.run(_serve(args, store, addr, events_addr))
    except OSError as exc:
        logger.error("kvstore cannot start: %s", exc)
        return 1
    finally:
        store.close()  # drains the write-behind queue to the SSD
    logger.info("kvstore stopped")
    return 0


if __name__ == "__main__":
    exit_process(main())
