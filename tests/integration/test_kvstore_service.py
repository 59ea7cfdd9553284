"""`python -m services.kvstore` as a real process over ipc://, driven through `KvStoreClient`.

Covers put/get/lookup/stats, the event stream (consecutive seq, fed into the scheduler's
PrefixIndex), refused bad requests, a hung store (timeouts, then recovery), kill -9 and restart
on the same directory (SSD blocks still served, the client reconnects by itself), and a value
corrupted on disk while the store is stopped (a miss, never wrong bytes).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
import zmq.asyncio

from common import bus
from common.kvstore_client import KvStoreClient
from common.protocol import KvEvent, KvGet, KvGetReply, KvPut, KvPutAck, KvSnapshotRequest
from services.scheduler.prefix_index import PrefixIndex

REPO = Path(__file__).resolve().parents[2]
NS = "smollm2-135m|float32|16"
BLOCK = 4096
SAFETY_S = 60.0  # bounds on waiting, never a performance claim

pytestmark = pytest.mark.timeout(180)


def h(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def block(i: int) -> bytes:
    seed = hashlib.blake2b(b"kv" + i.to_bytes(8, "little"), digest_size=64).digest()
    return bytes(b ^ (n & 0xFF) for n in range(BLOCK // 64) for b in seed)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Store:
    """One kvstore process on a data dir, restartable on the same dir and addresses."""

    def __init__(self, data_dir: Path, dram_blocks: int, ssd_blocks: int = 64) -> None:
        self.sock_dir = Path(tempfile.mkdtemp(prefix="xkv-", dir="/tmp"))  # ipc paths must be short
        self.addr = f"ipc://{self.sock_dir / 'kv.sock'}"
        self.events_addr = f"ipc://{self.sock_dir / 'kv-events.sock'}"
        self.data_dir = data_dir
        self.args = ["--dram-bytes", str(dram_blocks * BLOCK), "--ssd-bytes", str(ssd_blocks * (BLOCK + 64))]
        self.log = data_dir.parent / "kvstore.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "services.kvstore", "--dir", str(self.data_dir), "--addr", self.addr,
               "--events-addr", self.events_addr, *self.args, "--log-level", "INFO"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_die_with_parent)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=SAFETY_S)

    def stop(self) -> int:
        """SIGTERM; the exit code (a clean stop is 0)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=SAFETY_S)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=SAFETY_S)
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


async def eventually(predicate: Callable[[], Awaitable[Any]], what: str, store: Store | None = None) -> Any:
    """Await `predicate()` until it is truthy; fail with `what` after SAFETY_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SAFETY_S
    while True:
        value = await predicate()
        if value:
            return value
        if store is not None and store.proc is not None and store.proc.poll() is not None:
            raise AssertionError(f"kvstore exited with {store.proc.returncode}:\n{store.logs()[-3000:]}")
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}\n{store.logs()[-3000:] if store else ''}")
        await asyncio.sleep(0.05)


def new_client(store: Store, **kwargs: Any) -> KvStoreClient:
    return KvStoreClient(store.addr, context=zmq.asyncio.Context.instance(), retry_after_s=0.05,
                         max_retry_after_s=0.2, timeout_s=kwargs.pop("timeout_s", 5.0), **kwargs)


async def up(client: KvStoreClient, store: Store) -> dict:
    return await eventually(lambda: client.stats(timeout_s=2.0), "the kvstore to answer", store)


async def ssd_blocks_at_least(client: KvStoreClient, store: Store, n: int) -> dict:
    async def check():
        stats = await client.stats()
        return stats if stats and stats["ssd_blocks"] >= n and stats["writebehind_queued"] == 0 else None
    return await eventually(check, f"{n} blocks on the SSD tier", store)


class Events:
    """A SUB on the store's PUB, synced by asking for a snapshot until one arrives."""

    def __init__(self, store: Store) -> None:
        self.sock = bus.make_socket(zmq.SUB)
        bus.subscribe(self.sock, "kvstore")
        bus.connect(self.sock, store.events_addr)
        self.events: list[KvEvent] = []

    async def next(self, timeout_s: float = SAFETY_S) -> KvEvent:
        _, msg, _ = await asyncio.wait_for(bus.recv(self.sock), timeout_s)
        assert isinstance(msg, KvEvent)
        self.events.append(msg)
        return msg

    async def sync(self, client: KvStoreClient) -> KvEvent:
        """Until the first snapshot arrives (a PUB drops what it sends before we are joined)."""
        async def attempt():
            client.request_snapshot()
            try:
                while True:
                    event = await self.next(timeout_s=0.5)
                    if event.kind == "snapshot":
                        return event
            except asyncio.TimeoutError:
                return None
        return await eventually(attempt, "a snapshot event")

    async def drain_until(self, done: Callable[[list[KvEvent]], bool]) -> None:
        while not done(self.events):
            await self.next()

    def close(self) -> None:
        bus.close(self.sock, linger_ms=0)


def test_put_get_lookup_stats_and_events(tmp_path) -> None:
    store = Store(tmp_path / "kv", dram_blocks=3)

    async def scenario() -> None:
        client = new_client(store)
        await client.start()
        events = Events(store)
        try:
            await up(client, store)
            first = await events.sync(client)
            hashes = [h(i) for i in range(6)]
            assert client.put(NS, hashes, [torch.frombuffer(bytearray(block(i)), dtype=torch.uint8) for i in range(6)])
            stats = await ssd_blocks_at_least(client, store, 3)
            assert stats["dram_blocks"] == 3 and stats["dram_evictions"] == 3 and stats["put_blocks"] == 6

            found = await client.get(NS, hashes + [h(99)])
            assert [x[0] for x in found] == hashes
            assert [x[1] for x in found][:3] == ["ssd"] * 3
            assert all(bytes(x[2].numpy()) == block(i) for i, x in enumerate(found))
            tiers = await client.lookup(NS, hashes)
            assert len(tiers) == 6 and set(tiers) <= {"dram", "ssd"}
            assert await client.get(NS, [h(99)] + hashes) == []
            assert await client.get("other-model|float32|16", hashes) == []  # namespaced

            # Events: consecutive seq from the snapshot on; the index built from them agrees.
            index = PrefixIndex()

            def caught_up(seen: list[KvEvent]) -> bool:
                stored_ssd = {x for e in seen if (e.kind, e.tier) == ("stored", "ssd") for x in e.hashes}
                return stored_ssd >= set(hashes[:3])
            await events.drain_until(caught_up)
            start = events.events.index(first)
            stream = events.events[start:]
            assert [e.seq for e in stream] == list(range(first.seq, first.seq + len(stream)))
            assert all(index.apply(e) for e in stream)
            match = index.match(hashes)["kvstore"]
            assert match.get("ssd", 0) >= 3
            assert index.holds("kvstore", "ssd") >= set(hashes[:3])

            stats = await client.stats()
            for key in ("dram_bytes", "ssd_bytes", "dram_hits", "ssd_hits", "dram_misses", "ssd_misses",
                        "dram_evictions", "ssd_evictions", "corrupt_entries", "seq"):
                assert key in stats
            assert client.metrics()["kvstore_available"] == 1
        finally:
            events.close()
            await client.close()

    store.start()
    try:
        asyncio.run(scenario())
        assert store.stop() == 0
    finally:
        store.cleanup()


def test_bad_requests_are_refused_and_the_store_lives(tmp_path) -> None:
    store = Store(tmp_path / "kv", dram_blocks=4)

    async def scenario() -> None:
        client = new_client(store)
        await client.start()
        raw = bus.make_socket(zmq.DEALER)
        bus.connect(raw, store.addr)
        try:
            await up(client, store)
            payload = torch.frombuffer(bytearray(block(0)), dtype=torch.uint8)
            bad = [
                (KvPut(req_id="a", namespace=NS, hashes=[h(0), h(1)], want_ack=True), [payload]),  # 2 vs 1
                (KvPut(req_id="b", namespace=NS, hashes=[b"short"], want_ack=True), [payload]),
                (KvPut(req_id="c", namespace="", hashes=[h(0)], want_ack=True), [payload]),
                (KvPut(req_id="d", namespace=NS, hashes=[h(0)], want_ack=True), [payload.view(torch.int32)]),
            ]
            for msg, tensors in bad:
                await bus.send(raw, msg, *tensors)
                _, reply, _ = await asyncio.wait_for(bus.recv(raw), SAFETY_S)
                assert isinstance(reply, KvPutAck) and reply.req_id == msg.req_id
                assert reply.stored == 0 and reply.reason
            await raw.send_multipart([b"\x93not a message"])  # dropped with a log line
            await bus.send(raw, KvGet(req_id="g", namespace=NS, hashes=[b"x" * 31]))
            _, reply, _ = await asyncio.wait_for(bus.recv(raw), SAFETY_S)
            assert isinstance(reply, KvGetReply) and reply.hashes == []
            await bus.send(raw, KvSnapshotRequest(source="kvstore"))  # no reply expected, no harm
            await bus.send(raw, KvPut(req_id="ok", namespace=NS, hashes=[h(0)], want_ack=True), payload)
            _, reply, _ = await asyncio.wait_for(bus.recv(raw), SAFETY_S)
            assert isinstance(reply, KvPutAck) and reply.stored == 1 and reply.reason == ""
            stats = await client.stats()
            assert stats["bad_requests"] == 5 and stats["dram_blocks"] == 1
            assert not client.put(NS, [h(0)], [])  # the client refuses a count mismatch itself
        finally:
            bus.close(raw, linger_ms=0)
            await client.close()

    store.start()
    try:
        asyncio.run(scenario())
        assert store.stop() == 0
    finally:
        store.cleanup()


def test_kill9_restart_serves_ssd_and_client_recovers(tmp_path) -> None:
    store = Store(tmp_path / "kv", dram_blocks=2)
    hashes = [h(i) for i in range(6)]

    async def scenario() -> None:
        client = new_client(store, timeout_s=0.5)
        await client.start()
        try:
            await up(client, store)
            client.put(NS, hashes, [block(i) for i in range(6)])
            await ssd_blocks_at_least(client, store, 4)

            # A hung store: requests time out, the caller gets an empty answer, never an error.
            store.proc.send_signal(signal.SIGSTOP)
            assert await client.get(NS, hashes) == []
            assert client.timeouts == 1 and not client.available
            assert await client.lookup(NS, hashes) == []  # down: answered at once, no new timeout
            assert client.timeouts == 1
            store.proc.send_signal(signal.SIGCONT)
            await eventually(lambda: client.get(NS, hashes[:1]), "the client to recover", store)
            assert client.available

            # kill -9: nothing on DRAM survives, the SSD tier does.
            store.kill9()
            assert await client.get(NS, hashes) == []
            assert not client.available
            client.put(NS, [h(50)], [block(50)])  # queued or dropped, never raises
            store.start()
            found = await eventually(lambda: client.get(NS, hashes), "blocks served after the restart", store)
            # At least the 4 blocks DRAM pushed out at first (the gets above may have promoted
            # some and pushed the others out to the SSD as well).
            assert len(found) >= 4 and [x[0] for x in found] == hashes[: len(found)]
            assert [x[1] for x in found] == ["ssd"] * len(found)
            assert [bytes(x[2].numpy()) for x in found] == [block(i) for i in range(len(found))]
            assert client.available and client.metrics()["kvstore_available"] == 1
        finally:
            await client.close()

    store.start()
    try:
        asyncio.run(scenario())
        assert store.stop() == 0
    finally:
        store.cleanup()


def test_corrupted_value_on_disk_is_a_miss(tmp_path) -> None:
    store = Store(tmp_path / "kv", dram_blocks=1)
    hashes = [h(i) for i in range(4)]

    async def fill() -> None:
        client = new_client(store)
        await client.start()
        try:
            await up(client, store)
            client.put(NS, hashes, [block(i) for i in range(4)])
            await ssd_blocks_at_least(client, store, 3)
        finally:
            await client.close()

    async def read_back() -> None:
        client = new_client(store)
        await client.start()
        try:
            await up(client, store)
            found = await client.get(NS, hashes)
            assert [x[0] for x in found] == hashes[:1]  # block 1 is damaged: the run stops there
            assert bytes(found[0][2].numpy()) == block(0)
            assert await client.get(NS, hashes[1:2]) == []
            found = await client.get(NS, hashes[2:3])
            assert [bytes(x[2].numpy()) for x in found] == [block(2)]
            assert (await client.stats())["corrupt_entries"] == 1
        finally:
            await client.close()

    store.start()
    try:
        asyncio.run(fill())
        store.kill9()
        data = bytearray((store.data_dir / "data.mdb").read_bytes())
        needle = block(1)[1000:1064]
        hits = 0
        at = data.find(needle)
        while at >= 0:  # every copy LMDB may have left behind
            data[at + 10] ^= 0xFF
            hits += 1
            at = data.find(needle, at + 1)
        assert hits >= 1
        (store.data_dir / "data.mdb").write_bytes(bytes(data))
        store.start()
        asyncio.run(read_back())
        assert store.stop() == 0
    finally:
        store.cleanup()
