"""A decode worker's answer to an incoming KV hand-off: its role decides what it takes next, never
a promise already made (a candidate named before its latest flip is taken in); every refusal is
counted by reason in the stats the status page shows."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from common.engine.block_manager import NoFreePagesError
from common.protocol import KvTransferBegin, KvTransferReady, Sampling
from services.decode import kv_receiver
from services.decode.kv_receiver import Admission, KvReceiver
from services.worker.role_state import RoleState
from services.worker.worker import Worker

NAMESPACE = "m|float32|16"


def begin(candidate_flip_id: int | None, transfer_id: str = "t1", namespace: str = NAMESPACE) -> KvTransferBegin:
    return KvTransferBegin(
        transfer_id=transfer_id, request_id=f"r-{transfer_id}", source_instance="p0", prompt_ids=[1, 2, 3],
        output_ids=[4], sampling=Sampling(), priority="online", tokens_addr="ipc:///g", arrival_time=0.0,
        num_tokens=4, num_layers=2, page_size=16, dtype="float32", namespace=namespace,
        candidate_flip_id=candidate_flip_id)


def admission_of(*flips: str, draining: bool = False):
    """The admission of a worker started as decode that applied `flips` (ids 1, 2, ...)."""
    roles = RoleState("decode")
    for flip_id, role in enumerate(flips, 1):
        roles.flip(role, flip_id)
    worker = SimpleNamespace(instance_id="d0", draining=draining, roles=roles, role=roles.role)
    return lambda msg: Worker._decode_admission(worker, msg)  # type: ignore[arg-type]


def test_the_role_refuses_only_what_was_named_after_the_flip() -> None:
    assert admission_of()(begin(0)) == Admission(True, "role")
    flipped = admission_of("prefill")  # flip 1: decode -> prefill
    assert flipped(begin(0)) == Admission(True, "promised")  # named before flip 1: honoured
    after = flipped(begin(1))  # named after it (the scheduler would not, but a stale sender might)
    assert not after.ok and after.reason == "role" and after.message == "worker d0 is in the prefill role"
    assert not flipped(begin(None)).ok  # no promise at all: the role decides
    # Back to decode and out again: a candidate named while it was decode (flip 2) is honoured.
    assert admission_of("prefill", "decode", "prefill")(begin(2)).reason == "promised"
    assert admission_of("mixed")(begin(1)) == Admission(True, "role")


def test_a_draining_worker_refuses_even_a_promise() -> None:
    refused = admission_of("prefill", draining=True)(begin(0))
    assert not refused.ok and refused.reason == "draining"


class FakeHandoff:
    def __init__(self) -> None:
        self.reserved: list[str] = []
        self.out_of_pages = False

    def reserve_transfer(self, request_id: str, *args: Any, **kwargs: Any) -> None:
        if self.out_of_pages:
            raise NoFreePagesError("full")
        self.reserved.append(request_id)


def test_refusals_are_counted_by_reason_and_promises_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[KvTransferReady] = []

    async def send(sock: Any, msg: Any, *tensors: Any, identity: bytes | None = None) -> None:
        sent.append(msg)

    monkeypatch.setattr(kv_receiver.bus, "send", send)
    handoff = FakeHandoff()
    engine = SimpleNamespace(kv_namespace=NAMESPACE, num_layers=2, page_size=16, handoff=handoff)

    async def on_engine(fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def landed(msg: KvTransferBegin) -> None:
        pass

    receiver = KvReceiver(engine, on_engine, admission_of("prefill"), landed, timeout_s=30.0)  # type: ignore[arg-type]

    async def run() -> None:
        await receiver.handle(None, b"p0", begin(0, "kept"), [])  # type: ignore[arg-type]
        await receiver.handle(None, b"p0", begin(1, "late"), [])  # type: ignore[arg-type]
        await receiver.handle(None, b"p0", begin(0, "alien", namespace="other|x|1"), [])  # type: ignore[arg-type]
        handoff.out_of_pages = True
        await receiver.handle(None, b"p0", begin(0, "full"), [])  # type: ignore[arg-type]

    asyncio.run(run())
    assert [(m.transfer_id, m.ok) for m in sent] == [("kept", True), ("late", False), ("alien", False),
                                                      ("full", False)]
    assert "prefill role" in sent[1].reason
    assert handoff.reserved == ["r-kept"]
    stats = receiver.stats()
    assert stats["kv_refused"] == 3 and stats["kv_handoffs_refused_role"] == 1
    assert stats["kv_handoffs_refused_layout"] == 1 and stats["kv_handoffs_refused_no_pages"] == 1
    assert stats["kv_handoffs_refused_draining"] == 0 and stats["kv_handoffs_honoured_after_flip"] == 1
    assert stats["kv_incoming"] == 1
