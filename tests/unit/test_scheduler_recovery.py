"""The scheduler's side of recovery, on its handlers (no sockets): a dead worker's requests go
back to their gateway as retriable errors, a Submit sent again by the same gateway is not run
twice, nobody to route to is retriable, and the status lists dead instances."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.protocol import Register, RequestError, Sampling, Submit
from common.service_config import ServiceAddresses


def _server(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list, list]:
    from services.scheduler import server as module

    addresses = ServiceAddresses(frontend="ipc:///tmp/x-f", backend="ipc:///tmp/x-b", control="ipc:///tmp/x-c")
    scheduler = module.SchedulerServer(addresses)
    sent: list = []
    errors: list = []

    async def send(sock: Any, msg: Any, identity: bytes | None = None, **_: Any) -> None:
        sent.append((identity, msg))

    async def push(address: str, msg: RequestError) -> bool:
        errors.append(msg)
        return True

    monkeypatch.setattr(module.bus, "send", send)
    monkeypatch.setattr(scheduler.pushers, "send", push)
    return scheduler, sent, errors


def _submit(request_id: str, gateway: str = "gw") -> Submit:
    return Submit(request_id=request_id, prompt_ids=[1, 2, 3], sampling=Sampling(), gateway_id=gateway,
                  tokens_addr="ipc:///tmp/gw-tokens", arrival_time=0.0)


def _register(scheduler: Any, instance_id: str, incarnation: str) -> None:
    msg = Register(instance_id=instance_id, role="mixed", kv_addr="ipc:///tmp/kv", num_pages=64, page_size=16,
                   model="m", max_model_len=2048, incarnation=incarnation, pid=0)
    asyncio.run(scheduler._on_register(f"{instance_id}#{incarnation}".encode(), msg))


def test_no_worker_is_retriable(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, _, errors = _server(monkeypatch)
    asyncio.run(scheduler._on_submit(b"gw", _submit("r1")))
    assert errors[0].code == 503 and errors[0].retriable and errors[0].reason == "no_worker"


def test_a_resubmit_from_the_same_gateway_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, sent, errors = _server(monkeypatch)
    _register(scheduler, "w0", "a")
    asyncio.run(scheduler._on_submit(b"gw", _submit("r1")))
    asyncio.run(scheduler._on_submit(b"gw", _submit("r1")))
    assigns = [m for _, m in sent if type(m).__name__ == "Assign"]
    assert len(assigns) == 1 and errors == []
    asyncio.run(scheduler._on_submit(b"other", _submit("r1", gateway="gw2")))
    assert errors[-1].code == 409 and not errors[-1].retriable


def test_a_restarted_worker_returns_its_old_requests_as_retriable(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, _, errors = _server(monkeypatch)
    _register(scheduler, "w0", "a")
    asyncio.run(scheduler._on_submit(b"gw", _submit("r1")))
    _register(scheduler, "w0", "b")  # a new incarnation: the old process is dead
    assert [(e.request_id, e.code, e.retriable, e.reason) for e in errors] == [("r1", 503, True, "worker_lost")]
    summary = scheduler.status_summary()
    assert summary["dead_instances"][0]["id"] == "w0" and summary["dead_instances"][0]["incarnation"] == "a"
    assert summary["scheduler_id"]
    assert scheduler.registry.get("w0").incarnation == "b"


def test_a_worker_declared_dead_that_comes_back_drops_its_migrated_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler, sent, errors = _server(monkeypatch)
    _register(scheduler, "w0", "a")
    asyncio.run(scheduler._on_submit(b"gw", _submit("r1")))
    instance = scheduler.registry.get("w0")
    assert scheduler.registry.kill(instance, "no heartbeat for 3.1 s")
    asyncio.run(scheduler._instance_died(instance, "missed heartbeats"))
    assert errors[-1].reason == "worker_lost"
    sent.clear()
    _register(scheduler, "w0", "a")  # the same process: it was only silent
    aborts = [(identity, m.request_id) for identity, m in sent if type(m).__name__ == "AbortRequest"]
    assert aborts == [(b"w0#a", "r1")]
