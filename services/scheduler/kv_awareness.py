"""What the scheduler knows about KV placement: the global prefix index and its feeds.

Workers report their HBM prefix blocks on the backend socket; the kvstore publishes its DRAM and
SSD blocks on its PUB socket. Both carry per-source sequence numbers; on a gap the index asks
that source for a snapshot. `cached_tokens` turns the index into what routing needs: for each
candidate worker, how many prompt tokens it would not have to compute (its own HBM run, or the
kvstore's run, which any worker can reload).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import cast

import zmq
import zmq.asyncio

from common import bus
from common.engine.block_manager import prefix_hashes
from common.kvstore_client import KvStoreClient
from common.protocol import KVSTORE_EVENTS, KvEvent
from services.scheduler.prefix_index import PrefixIndex
from services.scheduler.registry import Instance

__all__ = ["KvAwareness", "KVSTORE_SOURCE"]

logger = logging.getLogger(__name__)

KVSTORE_SOURCE = "kvstore"
_STATS_INTERVAL_S = 2.0


class KvAwareness:
    def __init__(
        self,
        context: zmq.asyncio.Context,
        kvstore_addr: str | None = None,
        kvstore_events_addr: str | None = None,
        kvstore_source: str = KVSTORE_SOURCE,
    ) -> None:
        self.index = PrefixIndex()
        self._context = context
        self.kvstore_source = kvstore_source
        self.kvstore_events_addr = kvstore_events_addr
        self.client = KvStoreClient(kvstore_addr, context=context, timeout_s=1.0) if kvstore_addr else None
        self.kvstore_stats: dict = {}
        self._sub: zmq.asyncio.Socket | None = None

    def tasks(self) -> list[Awaitable]:
        if self.client is None or self.kvstore_events_addr is None:
            return []
        return [self._kvstore_events_loop(), self._kvstore_stats_loop()]

    async def start(self) -> None:
        if self.client is not None:
            await self.client.start()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self._sub is not None:
            bus.close(self._sub, linger_ms=0)
            self._sub = None

    # ---- feeds --------------------------------------------------------------------------

    def on_worker_event(self, event: KvEvent) -> bool:
        """Apply a worker's HBM event; False when the worker must be asked for a snapshot."""
        return self.index.apply(event)

    def forget(self, instance_id: str) -> None:
        self.index.forget(instance_id)

    async def _kvstore_events_loop(self) -> None:
        self._sub = bus.make_socket(zmq.SUB, channel=KVSTORE_EVENTS.connector, context=self._context)
        bus.subscribe(self._sub, self.kvstore_source)
        bus.connect(self._sub, self.kvstore_events_addr)
        # The store may hold blocks from before we started (its SSD tier survives restarts).
        await asyncio.sleep(0.2)  # let the subscription reach the publisher first
        self.client.request_snapshot("scheduler")
        while True:
            _, msg, _ = await bus.recv(self._sub)
            event = cast(KvEvent, msg)  # the only message this channel end takes
            if not self.index.apply(event):
                logger.info("kvstore events: gap before seq %d; asking for a snapshot", event.seq)
                self.client.request_snapshot("scheduler")

    async def _kvstore_stats_loop(self) -> None:
        while True:
            stats = await self.client.stats()
            self.kvstore_stats = stats if stats is not None else {"available": False}
            await asyncio.sleep(_STATS_INTERVAL_S)

    # ---- queries ------------------------------------------------------------------------

    def cached_tokens(self, instances: Iterable[Instance], prompt_ids: list[int]) -> dict[str, int]:
        """Prompt tokens each instance would find cached (HBM run, else the kvstore's run)."""
        out: dict[str, int] = {}
        hashes_by_layout: dict[tuple[str, int], list[bytes]] = {}
        for instance in instances:
            namespace = instance.kv_namespace
            if not namespace or instance.page_size <= 0:
                continue
            key = (namespace, instance.page_size)
            if key not in hashes_by_layout:
                hashes_by_layout[key] = prefix_hashes(prompt_ids, instance.page_size, namespace)
            hashes = hashes_by_layout[key]
            if not hashes:
                continue
            matches = self.index.match(hashes)
            own = matches.get(instance.instance_id, {}).get("hbm", 0)
            store = max(matches.get(self.kvstore_source, {}).values(), default=0) if self.client else 0
            # The engine always computes the last prompt token itself.
            out[instance.instance_id] = min(max(own, store) * instance.page_size, len(prompt_ids) - 1)
        return out

    def summary(self) -> dict:
        out: dict = {"prefix_index": self.index.sizes()}
        if self.client is not None:
            out["kvstore"] = self.kvstore_stats
        return out

