"""Instance liveness in the scheduler's registry (alive -> suspect -> dead), the socket-monitor
helpers, and routing around suspect instances."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from common.protocol import Heartbeat, Register
from services.scheduler.liveness import peer_pid, process_gone
from services.scheduler.registry import Registry
from services.scheduler.router import Router


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def register(registry: Registry, instance_id: str, incarnation: str = "a", pid: int = 0):
    msg = Register(instance_id=instance_id, role="mixed", kv_addr=f"ipc:///tmp/kv-{instance_id}", num_pages=50,
                   page_size=16, model="m", max_model_len=2048, incarnation=incarnation, pid=pid)
    return registry.register(f"{instance_id}#{incarnation}".encode(), msg)


def beat(registry: Registry, instance_id: str, incarnation: str = "a") -> None:
    msg = Heartbeat(instance_id=instance_id, role="mixed", waiting=0, running=0, free_pages=50, total_pages=50,
                    used_pages=0, prefix_hit_rate=0.0, queued_prefill_tokens=0, max_num_seqs=4, draining=False,
                    flipping=False, kv_namespace="", prompt_tokens_total=0, generated_tokens_total=0, stats={},
                    incarnation=incarnation)
    assert registry.heartbeat(f"{instance_id}#{incarnation}".encode(), msg) is not None


def test_silence_makes_suspect_then_dead_and_a_heartbeat_revives() -> None:
    clock = Clock()
    registry = Registry(heartbeat_timeout_s=3.0, clock=clock, suspect_after_s=1.5)
    register(registry, "w0")
    register(registry, "w1")
    clock.now += 1.6
    beat(registry, "w1")
    suspects, dead = registry.tick()
    assert [i.instance_id for i in suspects] == ["w0"] and dead == []
    w0 = registry.get("w0")
    assert w0 is not None and w0.liveness == "suspect" and not w0.alive
    described = {d["id"]: d for d in registry.describe()}
    assert described["w0"]["state"] == "suspect" and described["w0"]["ready"] is False
    assert registry.workers(2)["up"] == 1
    beat(registry, "w0")  # it spoke again: alive
    assert w0.alive and registry.tick() == ([], [])
    clock.now += 3.5
    beat(registry, "w1")
    suspects, dead = registry.tick()
    assert [i.instance_id for i in dead] == ["w0"] and "w0" not in registry
    listed = registry.dead_instances()
    assert listed[0]["id"] == "w0" and listed[0]["incarnation"] == "a" and "heartbeat" in listed[0]["reason"]


def test_a_new_incarnation_buries_the_old_one() -> None:
    registry = Registry(clock=Clock())
    register(registry, "w0", "a")
    registry.assign("w0", "r1")
    outcome, new, old = register(registry, "w0", "b")
    assert outcome.value == "replaced" and old is not None and old.inflight == {"r1"}
    assert new.incarnation == "b" and new.inflight == set()
    assert [(d["id"], d["incarnation"]) for d in registry.dead_instances()] == [("w0", "a")]


def test_kill_and_by_pid() -> None:
    registry = Registry(clock=Clock())
    _, inst, _ = register(registry, "w0", pid=4242)
    assert registry.by_pid(4242) is inst and registry.by_pid(1) is None and registry.by_pid(0) is None
    assert registry.kill(inst, "its process exited") and not registry.kill(inst, "again")
    assert registry.by_pid(4242) is None and registry.dead_instances()[0]["reason"] == "its process exited"


def test_an_unattributed_disconnect_makes_only_the_silent_suspect() -> None:
    clock = Clock()
    registry = Registry(heartbeat_timeout_s=3.0, clock=clock, suspect_after_s=1.5)
    register(registry, "w0")
    register(registry, "w1")
    clock.now += 0.2
    registry.note_unattributed_disconnect()
    clock.now += 0.5
    beat(registry, "w1")  # w1 still talks; w0 went quiet when the connection closed
    assert registry.tick() == ([], [])  # the probe window (suspect_after / 2) is not over yet
    clock.now += 0.3
    suspects, dead = registry.tick()
    assert [i.instance_id for i in suspects] == ["w0"] and dead == []
    assert registry.get("w1").alive  # type: ignore[union-attr]


def test_router_skips_suspect_instances_while_one_is_alive() -> None:
    clock = Clock()
    registry = Registry(clock=clock)
    register(registry, "w0")
    register(registry, "w1")
    w0, w1 = registry.get("w0"), registry.get("w1")
    assert w0 is not None and w1 is not None
    registry.mark_suspect(w0, "test")
    for _ in range(3):
        route = Router().route(registry.instances(), prompt_len=4)
        assert route is not None and route.prefill is w1
    registry.mark_suspect(w1, "test")  # nobody alive: still served rather than refused
    assert Router().route(registry.instances(), prompt_len=4) is not None


def test_peer_pid_and_process_gone() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    try:
        assert peer_pid(a.fileno()) == os.getpid()
    finally:
        a.close()
        b.close()
    tcp = socket.socket()
    try:
        assert peer_pid(tcp.fileno()) is None
    finally:
        tcp.close()
    assert not process_gone(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_gone(child.pid)


def test_judge_disconnect_kills_only_a_gone_process() -> None:
    import asyncio

    from services.scheduler.liveness import judge_disconnect

    registry = Registry(clock=Clock())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _, gone, _ = register(registry, "w0", pid=child.pid)
    _, alive, _ = register(registry, "w1", pid=os.getpid())
    assert asyncio.run(judge_disconnect(registry, child.pid)) is gone and "w0" not in registry
    assert asyncio.run(judge_disconnect(registry, os.getpid())) is None
    assert alive.liveness == "suspect" and "w1" in registry  # still running: never declared dead
    assert asyncio.run(judge_disconnect(registry, None)) is None  # unattributed: a probe, nobody dies
    assert "w1" in registry
