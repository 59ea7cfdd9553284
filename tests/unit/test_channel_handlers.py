"""Sockets bound to a channel end dispatch on message type with no fallback branch, so each
handler table must cover exactly what its end lets in; and the worker's load report turns its
stats snapshot into the typed Heartbeat fields the scheduler routes on."""

from __future__ import annotations

from types import SimpleNamespace

from common.protocol import BACKEND, CONTROL, FRONTEND, KV, KVSTORE, Heartbeat
from services.decode.kv_receiver import KvReceiver
from services.kvstore.server import KvStoreServer
from services.scheduler.server import SchedulerServer
from services.worker.inbox import Inbox
from services.worker.load_report import LoadReport


def test_every_handler_table_covers_its_channel_end_exactly() -> None:
    assert set(SchedulerServer._ON_FRONTEND) == FRONTEND.binder.inbound
    assert set(SchedulerServer._ON_BACKEND) == BACKEND.binder.inbound
    assert set(Inbox.ON_BACKEND) == BACKEND.connector.inbound
    assert set(Inbox.ON_CONTROL) == CONTROL.connector.inbound
    assert set(KvReceiver._HANDLERS) == KV.binder.inbound
    server = KvStoreServer(store=None, addr="ipc:///unused", events_addr="ipc:///unused")  # type: ignore[arg-type]
    assert set(server._handlers) == KVSTORE.binder.inbound


def _fake_worker(stats: dict) -> SimpleNamespace:
    engine = SimpleNamespace(kv_namespace="m|float32|16", load_stats=lambda: stats, num_pages=64, page_size=16,
                             model_path="m", max_model_len=2048)
    return SimpleNamespace(instance_id="w0", incarnation="i0", role="decode", kv_addr="ipc:///kv", engine=engine,
                           draining=True,
                           roles=SimpleNamespace(settling=True, last_flip_id=0))


def test_heartbeat_carries_what_the_scheduler_routes_on_as_typed_fields() -> None:
    stats = {
        "waiting": 2, "running": 3, "num_pages": 64, "free_pages": 40, "used_pages": 24,
        "queued_prefill_tokens": 700, "max_num_seqs": 8, "prompt_tokens_total": 1000,
        "generated_tokens_total": 50, "prefix_cache": {"prefix_hit_rate": 0.5}, "steps": 9,
    }
    report = LoadReport(_fake_worker(stats), run_on_engine=None, send_backend=None)  # type: ignore[arg-type]
    report.prime()
    beat = report.heartbeat_message()
    assert beat == Heartbeat(
        instance_id="w0", role="decode", waiting=2, running=3, free_pages=40, total_pages=64, used_pages=24,
        prefix_hit_rate=0.5, queued_prefill_tokens=700, max_num_seqs=8, draining=True, flipping=True,
        kv_namespace="m|float32|16", prompt_tokens_total=1000, generated_tokens_total=50, stats=stats,
        incarnation="i0",
    )
    # Before the engine reports anything, every count is 0 (the registry's capacity falls back to 1).
    empty = LoadReport(_fake_worker({}), run_on_engine=None, send_backend=None)  # type: ignore[arg-type]
    assert empty.heartbeat_message().max_num_seqs == 0 and empty.register_message().num_pages == 64
