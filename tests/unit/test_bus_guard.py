"""Junk on a bus socket stays cheap: rate-limited log lines, per-peer error budgets, pacing.

The flood tests use real ZeroMQ sockets (ipc in a temp dir); a sync DEALER sends the junk, as a
hostile process would. Nothing here asserts a duration: "cannot starve" is checked as "another
task got turns while the flood was being drained".
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio

from common import bus
from common.bus_guard import RATE_LIMITED, InboundGuard, invalid_message_counts
from common.codec import Refused, decode, encode
from common.log_limits import RateLimitedLog
from common.protocol import FRONTEND, StatusQuery


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="xguard-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------ RateLimitedLog


def test_rate_limited_log_logs_a_burst_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RateLimitedLog(logging.getLogger("t.rl"), "bad things", interval_s=10.0, burst=3, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        logged = [log.log("peer-a", "bad thing %d", i) for i in range(1000)]
        assert logged.count(True) == 3
        log.log("peer-b", "other peer")  # its own budget
        clock.now += 10.0
        log.log("peer-a", "after the interval")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:4] == ["bad thing 0", "bad thing 1", "bad thing 2", "other peer"]
    assert "997 more bad things from peer-a in the last 10 s were not logged" in lines[4]
    assert lines[5] == "after the interval"
    assert len(lines) == 6


def test_rate_limited_log_summary_comes_from_a_timer_when_the_flood_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        log = RateLimitedLog(logging.getLogger("t.rl2"), "drops", interval_s=0.05, burst=1)
        for _ in range(5):
            log.log("k", "drop")
        await asyncio.sleep(0.3)

    with caplog.at_level(logging.WARNING, logger="t.rl2"):
        asyncio.run(scenario())
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "drop" and "4 more drops from k" in lines[1] and len(lines) == 2


def test_rate_limited_log_keeps_a_bounded_number_of_keys(caplog: pytest.LogCaptureFixture) -> None:
    log = RateLimitedLog(logging.getLogger("t.rl3"), "x", burst=1, max_keys=8, clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="t.rl3"):
        for i in range(10_000):  # a peer reconnecting under fresh identities
            log.log(f"peer-{i}", "line")
    assert len(log._windows) <= 9
    assert len(caplog.records) <= 9


# ------------------------------------------------------------------------------ InboundGuard


def test_a_peer_past_its_error_budget_is_muted_for_the_rest_of_the_window() -> None:
    clock = FakeClock()
    guard = InboundGuard("ROUTER", per_peer=True, budget=3, window_s=10.0, clock=clock)
    before = invalid_message_counts().get(RATE_LIMITED, 0)
    for _ in range(4):
        assert guard.admit(b"evil")
        guard.refused(b"evil", "malformed", "junk", lambda: "identity=b'evil'")
    assert not guard.admit(b"evil")  # muted: dropped unread
    assert guard.admit(b"honest")  # others are not
    assert invalid_message_counts()[RATE_LIMITED] == before + 1
    clock.now += 10.0
    assert guard.admit(b"evil")  # a fresh window, a fresh budget


def test_sockets_without_peer_identities_are_never_muted() -> None:
    guard = InboundGuard("PULL", per_peer=False, budget=1)
    for _ in range(10):
        guard.refused(None, "malformed", "junk", lambda: "peer=unknown")
    assert guard.admit(None)


def test_deeply_nested_msgpack_is_refused_not_a_recursion_error() -> None:
    deep = b"\x91" * 100_000 + b"\xc0"
    header = b"\x83" + b"".join(msgspec.msgpack.encode(v) for v in ("t", "status_query", "v", 1, "x"))
    with pytest.raises(Refused) as error:
        decode([header + deep])
    assert error.value.kind == "malformed" and "nested too deeply" in error.value.reason
    with pytest.raises(Refused) as error:
        decode([deep])
    assert error.value.kind == "malformed"


# -------------------------------------------------------------------------- a real flood


def test_a_junk_flood_is_drained_cheaply_without_starving_the_loop(
        ipc_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    flood = 20_000
    counts_before = invalid_message_counts()
    turns = 0

    async def scenario() -> None:
        context = zmq.asyncio.Context()
        sync = zmq.Context()
        router = bus.make_socket(zmq.ROUTER, channel=FRONTEND.binder, context=context)
        endpoint = bus.bind(router, bus.ipc_address("front", "g", directory=ipc_dir))
        junk = sync.socket(zmq.DEALER)
        junk.setsockopt(zmq.SNDHWM, 0)
        junk.connect(endpoint)
        honest = sync.socket(zmq.DEALER)
        honest.connect(endpoint)

        async def other_task() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(other_task())
        try:
            for _ in range(flood):
                junk.send(b"\xc1 junk")
            honest.send_multipart(encode(StatusQuery()))
            valid: list = []

            async def consume() -> None:
                while True:
                    valid.append((await bus.recv(router))[1])

            consumer = asyncio.create_task(consume())

            async def drained() -> None:
                while sum(invalid_message_counts().values()) - sum(counts_before.values()) < flood:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(drained(), 60)
            consumer.cancel()
            assert valid == [StatusQuery()]
        finally:
            ticker.cancel()
            junk.close(0)
            honest.close(0)
            bus.close(router)
            sync.term()
            context.destroy(linger=0)

    with caplog.at_level(logging.WARNING, logger="common.bus"):
        asyncio.run(scenario())
    counts = invalid_message_counts()
    assert counts.get("malformed", 0) - counts_before.get("malformed", 0) <= 201  # the error budget (+1)
    assert counts.get(RATE_LIMITED, 0) - counts_before.get(RATE_LIMITED, 0) >= flood - 201
    lines = [r.getMessage() for r in caplog.records if r.name == "common.bus"]
    assert len(lines) <= 12, lines[:20]  # a few full lines, one mute line (not 20,000)
    assert any("muted" in line for line in lines)
    # pacing: the other task ran many times while the flood was drained (every 64 messages at least)
    assert turns >= flood // 64 // 2
