"""The scheduler's request table: who holds each request, and the prefill charge it carries."""

from __future__ import annotations

import pytest

from services.scheduler.registry import Registry
from services.scheduler.request_table import RequestTable
from test_registry import heartbeat_msg, register_msg


@pytest.fixture
def registry() -> Registry:
    registry = Registry(heartbeat_timeout_s=3.0, clock=lambda: 100.0)
    for name in ("p0", "d0"):
        registry.register(name.encode(), register_msg(name))
    return registry


def _add(table: RequestTable, registry: Registry, request_id: str = "r1", prompt_len: int = 100,
         cached: int = 32) -> None:
    table.add(registry.get("p0"), request_id=request_id, gateway_identity=b"gw", gateway_id="gw",
              tokens_addr="ipc:///tmp/t.sock", prompt_len=prompt_len, cached_tokens=cached,
              decode_candidates=["d0"])


def test_a_routed_request_is_charged_its_uncached_prompt(registry):
    table = RequestTable(registry)
    _add(table, registry)
    prefill = registry.get("p0")
    assert "r1" in table and len(table) == 1
    assert prefill.inflight == {"r1"} and prefill.prefill_tokens_since_heartbeat == 68
    entry = table.finish("r1", "p0")
    assert entry is not None and entry.decode_candidates == ["d0"]
    assert "r1" not in table and prefill.inflight == set() and prefill.prefill_tokens_since_heartbeat == 0


def test_a_heartbeat_replaces_the_charge_so_finishing_does_not_take_it_twice(registry):
    table = RequestTable(registry)
    _add(table, registry)
    registry.heartbeat(b"p0", heartbeat_msg("p0", queued_prefill_tokens=68))
    prefill = registry.get("p0")
    assert prefill.prefill_tokens_since_heartbeat == 0 and prefill.queued_prefill_tokens == 68
    _add(table, registry, "r2", prompt_len=50, cached=0)
    table.finish("r1", "p0")
    assert prefill.prefill_tokens_since_heartbeat == 50  # r2's charge stays


def test_hand_over_moves_the_request_and_only_its_new_holder_finishes_it(registry):
    table = RequestTable(registry)
    _add(table, registry)
    entry = table.get("r1")
    table.hand_over(entry, "d0")
    assert entry.instance_id == "d0" and entry.decode_candidates == []
    assert registry.get("p0").inflight == set() and registry.get("d0").inflight == {"r1"}
    assert registry.get("p0").prefill_tokens_since_heartbeat == 0
    assert table.finish("r1", "p0") is None and "r1" in table
    assert table.finish("r1", "d0") is entry


def test_abort_and_the_requests_of_a_dead_instance(registry):
    table = RequestTable(registry)
    _add(table, registry, "r1")
    _add(table, registry, "r2")
    assert table.abort("r1").request_id == "r1" and table.abort("r1") is None
    assert registry.get("p0").inflight == {"r2"}
    taken = table.take_requests_of(registry.get("p0"))
    assert [e.request_id for e in taken] == ["r2"] and len(table) == 0 and registry.get("p0").inflight == set()
