"""A worker's side of KV-centric storage: HBM (its page pool) <-> the kvstore (DRAM, SSD).

- Offload: when the prefix cache evicts full pages to reuse them, the engine hands us copies of
  their KV (on the engine thread); they go to the kvstore's put queue without waiting.
- Reload: before a request is admitted, the pages after the local prefix hit are asked from the
  kvstore (on the event loop, bounded by a short timeout); at admission, in the same engine
  call that adds the request, the hits are written into free pages as cached prefix pages, so
  the engine's normal prefix match picks them up instead of recomputing them.
- Events: pages entering / leaving the HBM prefix cache become `KvEvent`s (tier "hbm", one
  sequence number per event) for the scheduler's global prefix index; a snapshot of every
  cached hash answers the index's resync request.

With no kvstore configured only the events run. A kvstore that is down or slow costs one short
timeout per admission at worst (the client marks it down and stops asking until a probe
succeeds); serving never waits on it beyond that.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from common.kvstore_client import KvStoreClient
from common.protocol import BackendMessage, KvEvent
from services.worker.engine_api import WorkerEngine

__all__ = ["KvTiering", "DEFAULT_FETCH_TIMEOUT_S"]

logger = logging.getLogger(__name__)

DEFAULT_FETCH_TIMEOUT_S = 0.25

RunOnEngine = Callable[..., Awaitable[Any]]
SendBackend = Callable[[BackendMessage], Awaitable[None]]


@dataclass
class _Fetched:
    start_page: int  # index of the first fetched page in the prompt's pages
    found: list[tuple[bytes, str, Any]]  # (hash, tier, payload), a leading run


class KvTiering:
    def __init__(
        self,
        engine: WorkerEngine,
        run_on_engine: RunOnEngine,
        instance_id: str,
        send_backend: SendBackend,
        client: KvStoreClient | None = None,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.run_on_engine = run_on_engine
        self.instance_id = instance_id
        self.send_backend = send_backend
        self.client = client
        self.fetch_timeout_s = fetch_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: list[tuple[str, list[bytes]]] = []
        self._seq = 0
        self.hit_tokens: Counter[str] = Counter()  # prefix-hit tokens by tier: hbm, dram, ssd
        # Assigns whose prefix is being reloaded, those aborted meanwhile, and what was loaded.
        self._reloading: dict[str, asyncio.Task] = {}
        self._aborted: set[str] = set()
        self._fetched: dict[str, _Fetched] = {}
        self.offloaded_blocks = 0
        self.reloaded_blocks = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.client is not None:
            await self.client.start()
        # Hooks fire on the engine thread; they only hand data over to the loop.
        self.engine.store_hooks.set_kv_event_hook(self._on_event)
        if self.client is not None:
            self.engine.store_hooks.set_offload_hook(self._on_offload)

    async def close(self) -> None:
        for task in self._reloading.values():
            task.cancel()
        self.engine.store_hooks.set_kv_event_hook(None)
        self.engine.store_hooks.set_offload_hook(None)
        if self.client is not None:
            await self.client.close()

    # ---- engine-thread hooks -------------------------------------------------------------

    def _on_event(self, kind: str, hashes: list[bytes]) -> None:
        if self._loop is not None and hashes:
            self._loop.call_soon_threadsafe(self._events.append, (kind, list(hashes)))

    def _on_offload(self, hashes: list[bytes], payloads: list[Any]) -> None:
        if self._loop is not None and self.client is not None and hashes:
            self._loop.call_soon_threadsafe(self._offload, list(hashes), list(payloads))

    def _offload(self, hashes: list[bytes], payloads: list[Any]) -> None:
        if self.client is not None and self.client.put(self.engine.kv_namespace, hashes, payloads):
            self.offloaded_blocks += len(hashes)

    # ---- admission ------------------------------------------------------------------------

    def reload_then(self, msg: Any, admit: Callable[[Any], None]) -> None:
        """Fetch `msg`'s (an Assign) prefix pages from the kvstore in the background, then
        `admit(msg)` unless it was aborted meanwhile; `load` writes them in at admission.
        Admission order across requests may change; a request's own abort is `abort_reload`."""
        async def run() -> None:
            fetched = None
            try:
                fetched = await self.fetch(list(msg.prompt_ids))
            except Exception:
                logger.exception("kvstore fetch for %s failed; computing its prefix", msg.request_id)
            finally:
                self._reloading.pop(msg.request_id, None)
            if msg.request_id in self._aborted:
                self._aborted.discard(msg.request_id)
                return
            if fetched is not None:
                self._fetched[msg.request_id] = fetched
            admit(msg)

        self._reloading[msg.request_id] = asyncio.create_task(run(), name=f"reload {msg.request_id}")

    def abort_reload(self, request_id: str) -> bool:
        """An abort for a request still fetching: it will not be admitted. True if it was."""
        if request_id not in self._reloading:
            return False
        self._aborted.add(request_id)
        return True

    async def fetch(self, prompt_ids: list[int]) -> _Fetched | None:
        """Ask the kvstore for the full pages after the local prefix hit (on the event loop, so
        it never waits behind an engine step)."""
        if self.client is None:
            return None
        engine = self.engine
        hashes = engine.store_hooks.prefix_hashes(prompt_ids)  # pure: no engine state
        # The engine recomputes at least the last prompt token, so a page ending exactly at the
        # prompt's end would never be used.
        usable = min(len(hashes), (len(prompt_ids) - 1) // engine.page_size)
        try:
            # Read off the engine thread: a stale answer only asks the store for a page we have
            # (skipped at insert) or for fewer than we could; both are harmless.
            local = engine.store_hooks.cached_prefix_pages(prompt_ids)
        except (KeyError, RuntimeError):
            local = 0
        if local >= usable:
            return None
        found = await self.client.get(engine.kv_namespace, hashes[local:usable], timeout_s=self.fetch_timeout_s)
        return _Fetched(local, found) if found else None

    def load(self, request_id: str, prompt_ids: list[int]) -> dict[str, int]:
        """On the engine thread, right before the request is added: write its fetched pages into
        the page pool as cached prefix pages. Returns the prompt tokens loaded, by tier."""
        fetched = self._fetched.pop(request_id, None)
        if fetched is None:
            return {}
        payloads = [payload for _, _, payload in fetched.found]
        try:
            inserted = self.engine.store_hooks.insert_cached_pages(prompt_ids, fetched.start_page, payloads)
        except ValueError as exc:
            logger.warning("kvstore blocks for %s were unusable: %s", request_id, exc)
            return {}
        self.reloaded_blocks += inserted
        loaded: Counter[str] = Counter()
        for _, tier, _ in fetched.found[:inserted]:
            loaded[tier] += self.engine.page_size
        return dict(loaded)

    def count_hit(self, cached_tokens: int, from_store: dict[str, int]) -> None:
        """Account one request's prefix hit: what the store loaded, the rest came from HBM."""
        store_tokens = 0
        for tier, tokens in from_store.items():
            used = min(tokens, max(0, cached_tokens - store_tokens))
            self.hit_tokens[tier] += used
            store_tokens += used
        self.hit_tokens["hbm"] += max(0, cached_tokens - store_tokens)

    # ---- events ---------------------------------------------------------------------------

    async def flush_events(self) -> None:
        """Send the HBM events gathered since the last flush (merged per kind, in order)."""
        if not self._events:
            return
        events, self._events = self._events, []
        merged: list[tuple[str, list[bytes]]] = []
        for kind, hashes in events:
            if merged and merged[-1][0] == kind:
                merged[-1][1].extend(hashes)
            else:
                merged.append((kind, list(hashes)))
        for kind, hashes in merged:
            await self._send_event(kind, hashes)

    async def send_snapshot(self) -> None:
        """Every hash in the HBM prefix cache, for an index that lost track of this worker."""
        self._events.clear()  # the snapshot supersedes them
        hashes = await self.run_on_engine(self.engine.store_hooks.cached_hashes)
        await self._send_event("snapshot", list(hashes))

    async def _send_event(self, kind: str, hashes: list[bytes]) -> None:
        await self.send_backend(KvEvent(source=self.instance_id, seq=self._seq, kind=kind, tier="hbm", hashes=hashes))
        self._seq += 1

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prefix_hit_tokens": {tier: self.hit_tokens.get(tier, 0) for tier in ("hbm", "dram", "ssd")},
            "kv_namespace": self.engine.kv_namespace,
            "kv_offloaded_blocks": self.offloaded_blocks,
            "kv_reloaded_blocks": self.reloaded_blocks,
        }
        if self.client is not None:
            out.update(self.client.metrics())
        return out
