"""The scheduler's instance registry: registration, incarnations, heartbeats, liveness."""

from __future__ import annotations

import pytest

from common.protocol import Heartbeat, Register
from services.scheduler.registry import Registry, RegisterOutcome


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def register_msg(instance_id: str = "w0", num_pages: int = 50, role: str = "decode") -> Register:
    return Register(instance_id=instance_id, role=role, kv_addr=f"ipc:///tmp/kv-{instance_id}.sock",
                    num_pages=num_pages, page_size=16, model="m", max_model_len=2048)


def heartbeat_msg(instance_id: str = "w0", waiting: int = 0, running: int = 0, free: int = 50, **fields) -> Heartbeat:
    values = dict(instance_id=instance_id, role="decode", waiting=waiting, running=running, free_pages=free,
                  total_pages=50, used_pages=50 - free, prefix_hit_rate=0.25, queued_prefill_tokens=0,
                  max_num_seqs=0, draining=False, flipping=False, kv_namespace="", prompt_tokens_total=0,
                  generated_tokens_total=0, stats={})
    return Heartbeat(**{**values, **fields})


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(clock: Clock) -> Registry:
    return Registry(heartbeat_timeout_s=3.0, clock=clock)


def test_register_new_then_refresh_keeps_state(registry: Registry) -> None:
    outcome, inst, old = registry.register(b"w0#a", register_msg())
    assert outcome is RegisterOutcome.NEW and old is None
    assert inst.free_pages == inst.total_pages == 50
    registry.assign("w0", "r1")
    # The same process registering again (a lost ack) must not lose its requests.
    outcome, again, old = registry.register(b"w0#a", register_msg(num_pages=60))
    assert outcome is RegisterOutcome.REFRESHED and old is None
    assert again is inst and again.inflight == {"r1"} and again.num_pages == 60
    assert len(registry) == 1


def test_register_from_new_process_replaces_and_returns_old(registry: Registry) -> None:
    registry.register(b"w0#a", register_msg())
    registry.assign("w0", "r1")
    outcome, inst, old = registry.register(b"w0#b", register_msg())
    assert outcome is RegisterOutcome.REPLACED
    assert old is not None and old.inflight == {"r1"}
    assert inst.inflight == set() and inst.identity == b"w0#b"
    assert registry.by_identity(b"w0#a") is None
    assert registry.by_identity(b"w0#b") is inst


def test_heartbeat_updates_load_and_rejects_unknown(registry: Registry, clock: Clock) -> None:
    registry.register(b"w0#a", register_msg())
    assert registry.heartbeat(b"stranger", heartbeat_msg()) is None
    # A known identity claiming another instance's id is not accepted either.
    assert registry.heartbeat(b"w0#a", heartbeat_msg("w1")) is None
    clock.now += 1.0
    inst = registry.heartbeat(b"w0#a", heartbeat_msg(waiting=2, running=3, free=40, max_num_seqs=8))
    assert inst is not None
    assert (inst.waiting, inst.running, inst.free_pages, inst.capacity) == (2, 3, 40, 8)
    assert inst.last_heartbeat == clock.now
    desc = registry.describe()[0]
    assert desc["id"] == "w0" and desc["used_pages"] == 10 and desc["prefix_hit_rate"] == 0.25
    assert desc["last_heartbeat_age"] == 0.0


def test_expire_removes_silent_instances_only(registry: Registry, clock: Clock) -> None:
    registry.register(b"a", register_msg("w0"))
    registry.register(b"b", register_msg("w1"))
    clock.now += 2.0
    registry.heartbeat(b"b", heartbeat_msg("w1"))
    clock.now += 1.5  # w0 silent 3.5 s, w1 1.5 s
    dead = registry.expire()
    assert [i.instance_id for i in dead] == ["w0"]
    assert "w0" not in registry and "w1" in registry
    assert registry.by_identity(b"a") is None
    assert registry.expire() == []


def test_deregister_needs_the_owning_process(registry: Registry) -> None:
    registry.register(b"a", register_msg("w0"))
    assert registry.deregister(b"intruder", "w0") is None
    assert "w0" in registry
    assert registry.deregister(b"a", "w0") is not None
    assert "w0" not in registry and len(registry) == 0


def test_load_counts_scheduler_inflight_between_heartbeats(registry: Registry) -> None:
    _, inst, _ = registry.register(b"a", register_msg("w0"))
    assert inst.load == 0
    registry.assign("w0", "r1")
    registry.assign("w0", "r2")
    assert inst.load == 2 and inst.assigned_total == 2
    registry.heartbeat(b"a", heartbeat_msg("w0", waiting=1, running=4))
    assert inst.load == 5  # the heartbeat is higher (n > 1 sequences per request)
    registry.release("w0", "r1")
    registry.release("w0", "unknown")
    assert inst.inflight == {"r2"}


# ------------------------------------------------------------------------------ role flips


def test_a_heartbeat_sent_before_the_worker_saw_a_flip_does_not_undo_it(registry: Registry) -> None:
    _, inst, _ = registry.register(b"a", register_msg("w0", role="decode"))
    inst.pending_role, inst.pending_flip = "prefill", 1  # what RoleFlips.order leaves
    registry.heartbeat(b"a", heartbeat_msg("w0", role="decode", flip_id=0))  # sent before the order
    assert inst.role == "decode" and inst.pending_role == "prefill"
    desc = registry.describe()[0]
    assert desc["state"] == "flipping" and desc["role"] == "decode" and desc["pending_role"] == "prefill"
    # A heartbeat that answers the order settles it as a FlipAck would (the ack may be behind).
    registry.heartbeat(b"a", heartbeat_msg("w0", role="prefill", flip_id=1))
    assert inst.role == "prefill" and inst.pending_role is None and inst.flip_id == 1
    assert registry.describe()[0]["state"] == "ready"


def test_a_refreshed_registration_keeps_a_pending_flip_and_learns_the_flip_generation(registry: Registry) -> None:
    _, inst, _ = registry.register(b"a", register_msg("w0", role="decode"))
    inst.pending_role, inst.pending_flip = "prefill", 1
    registry.register(b"a", register_msg("w0", role="decode"))  # the same process, a lost RegisterAck
    assert inst.role == "decode" and inst.pending_role == "prefill" and inst.pending_flip == 1
    # A worker that applied flips under an earlier scheduler says so when it registers here.
    _, other, _ = registry.register(b"b", Register(instance_id="w1", role="prefill", kv_addr="ipc:///kv1",
                                                   num_pages=8, page_size=16, model="m", max_model_len=64,
                                                   flip_id=12))
    assert other.flip_id == 12 and other.role == "prefill"


def test_workers_up_counts_registered_settled_workers(registry: Registry) -> None:
    assert registry.workers(3) == {"expected": 3, "up": 0, "by_role": {"prefill": 0, "decode": 0, "mixed": 0}}
    registry.register(b"p", register_msg("p0", role="prefill"))
    _, d0, _ = registry.register(b"d0", register_msg("d0", role="decode"))
    _, d1, _ = registry.register(b"d1", register_msg("d1", role="decode"))
    assert registry.workers(3)["up"] == 3
    d0.pending_role, d0.pending_flip = "prefill", 1  # mid-flip: serves no new work now
    d1.draining = True
    assert registry.workers(3) == {"expected": 3, "up": 1, "by_role": {"prefill": 1, "decode": 0, "mixed": 0}}
    assert registry.workers(None)["expected"] is None
