"""The scheduler's routing policy: least loaded by (waiting + running) / capacity, free pages next."""

from __future__ import annotations

from services.scheduler.registry import Instance
from services.scheduler.router import Router


def make(instance_id: str, *, waiting: int = 0, running: int = 0, free: int = 100, capacity: int = 8,
         inflight: int = 0, assigned: int = 0, max_model_len: int = 2048, draining: bool = False) -> Instance:
    inst = Instance(instance_id=instance_id, identity=instance_id.encode(), role="decode", kv_addr="",
                    num_pages=100, page_size=16, model="m", max_model_len=max_model_len, registered_at=0.0,
                    last_heartbeat=0.0, waiting=waiting, running=running, free_pages=free, total_pages=100,
                    stats={"max_num_seqs": capacity, "draining": draining})
    inst.inflight = {f"{instance_id}-r{i}" for i in range(inflight)}
    inst.assigned_total = assigned
    return inst


def test_no_instances_no_route() -> None:
    assert Router().choose([]) is None
    assert Router().choose([make("a", draining=True)]) is None


def test_least_loaded_relative_to_capacity() -> None:
    # b has more sequences but twice the capacity: 3/8 < 2/4.
    a = make("a", running=2, capacity=4)
    b = make("b", running=3, capacity=8)
    assert Router().choose([a, b]) is b


def test_waiting_counts_as_load() -> None:
    a = make("a", waiting=3)
    b = make("b", running=1)
    assert Router().choose([a, b]) is b


def test_free_pages_break_ties() -> None:
    a = make("a", running=1, free=10)
    b = make("b", running=1, free=90)
    assert Router().choose([a, b]) is b


def test_idle_equals_alternate_by_assignments() -> None:
    a, b = make("a"), make("b")
    router = Router()
    picks = []
    for _ in range(4):
        chosen = router.choose([a, b])
        chosen.assigned_total += 1
        picks.append(chosen.instance_id)
    assert picks == ["a", "b", "a", "b"]


def test_inflight_between_heartbeats_spreads_a_burst() -> None:
    # Both report idle, but the scheduler already gave `a` two requests since its last heartbeat.
    a = make("a", inflight=2)
    b = make("b")
    assert Router().choose([a, b]) is b


def test_draining_instance_is_skipped() -> None:
    a = make("a", draining=True)
    b = make("b", running=7)
    assert Router().choose([a, b]) is b


def test_prompt_longer_than_a_context_prefers_one_that_fits() -> None:
    small = make("small", max_model_len=512)
    large = make("large", running=5, max_model_len=4096)
    assert Router().choose([small, large], prompt_len=1000) is large
    # Nobody fits: still routed, the worker answers with a clear 400.
    assert Router().choose([small], prompt_len=1000) is small
