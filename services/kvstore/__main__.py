"""`python -m services.kvstore`: the tiered KV block store (DRAM + LMDB on SSD) as a service.

    python -m services.kvstore --dir /var/lib/xllm/kv --dram-bytes 4GiB --ssd-bytes 100GiB \
        [--run-dir DIR | --addr ADDR --events-addr ADDR] [--log-level INFO]

Addresses default to `kvstore.sock` / `kvstore-events.sock` in the run dir (see
`common.kvstore_client.kvstore_addresses`), so workers and the scheduler find it the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import lmdb
import uvloop

from common.kvstore_client import kvstore_addresses
from common.service_config import (
    ServiceConfig,
    addresses_from_args,
    exit_process,
    parse_args_with_config,
    setup_logging,
)
from common.settings import from_namespace
from services.kvstore.config import KvStoreConfig, build_parser
from services.kvstore.server import KvStoreServer
from services.kvstore.ssd_tier import DirectoryInUse
from services.kvstore.store import KvStore

logger = logging.getLogger("services.kvstore")


async def _serve(service: ServiceConfig, config: KvStoreConfig, store: KvStore, addr: str,
                 events_addr: str) -> None:
    addresses = addresses_from_args(service, "kvstore")
    server = KvStoreServer(
        store, addr, events_addr, source=config.source_id, max_block_bytes=config.max_block_bytes,
        max_message_bytes=config.max_message_bytes,
        allowed_namespaces=set(config.namespace) if config.namespace else None, curve=addresses.curve,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.bind()
    await server.serve(stop)


def main(argv: list[str] | None = None) -> int:
    args = parse_args_with_config(build_parser(), argv)
    service, config = from_namespace(ServiceConfig, args), from_namespace(KvStoreConfig, args)
    setup_logging(service.log_level, "kvstore")
    addr, events_addr = config.addr, config.events_addr
    if addr is None or events_addr is None:
        run_dir = addresses_from_args(service, "kvstore").run_dir
        if run_dir is None:
            logger.error("give --addr and --events-addr, or --run-dir")
            return 2
        default_addr, default_events = kvstore_addresses(run_dir)
        addr, events_addr = addr or default_addr, events_addr or default_events
    for problem in config.problems():
        logger.error("%s", problem)
        return 2
    try:
        store = KvStore(config.dir, config.dram_bytes, config.ssd_bytes, writebehind_bytes=config.writebehind_bytes,
                        sync=not config.no_sync)
    except (DirectoryInUse, OSError, lmdb.Error) as exc:
        logger.error("kvstore cannot open %s: %s", config.dir, exc)
        return 1
    try:
        uvloop.run(_serve(service, config, store, addr, events_addr))
    except OSError as exc:
        logger.error("kvstore cannot start: %s", exc)
        return 1
    finally:
        store.close()  # drains the write-behind queue to the SSD
    logger.info("kvstore stopped")
    return 0


if __name__ == "__main__":
    exit_process(main())
