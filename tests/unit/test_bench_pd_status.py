"""`xllm bench pd` reading `/status`: the layout count (the scheduler's `workers` block, else the
ready instances), waiting for the whole layout against a fake `/status` on 127.0.0.1, and the
flips, refused hand-offs and predictor error a run records."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.client import BenchError
from bench.pd_status import (StatusRecorder, layout_state, predictor_error, sum_instance_stat, wait_for_layout)


def _status(up: int | None = None, expected: int | None = 3, *, flips_total: int | None = None,
            recent: list[dict] | None = None, refused: list[int] | None = None, predictor: dict | None = None,
            roles: dict[str, str] | None = None) -> dict:
    scheduler: dict = {}
    if up is not None:
        scheduler["workers"] = {"expected": expected, "up": up, "by_role": {"prefill": 1, "decode": up - 1}}
    if flips_total is not None:
        scheduler["flips_total"] = flips_total
        scheduler["recent_flips"] = recent or []
    if predictor is not None:
        scheduler["policy"] = {"last_reason": "prefill pressure 1.4", "ttft_predictor": predictor}
    roles = roles or {"prefill-0": "prefill", "decode-0": "decode"}
    instances = [{"id": iid, "role": role, "ready": True, "stats": {}} for iid, role in roles.items()]
    for inst, count in zip(instances, refused or []):
        inst["stats"]["kv_handoffs_refused_role"] = count
    return {"scheduler": scheduler, "instances": instances}


def test_layout_from_the_workers_block_or_the_ready_instances() -> None:
    state = layout_state(_status(up=2, expected=3))
    assert (state.up, state.expected, state.source) == (2, 3, "scheduler")
    assert state.by_role == {"prefill": 1, "decode": 1} and not state.complete()
    assert layout_state(_status(up=3, expected=3)).complete()
    # The scheduler's count wins over the bench's own; with none, the bench's; with neither, one worker.
    assert not layout_state(_status(up=2, expected=3)).complete(fallback_expected=2)
    assert layout_state(_status(up=2, expected=None)).complete(fallback_expected=2)
    assert layout_state(_status(up=1, expected=None)).complete()
    # No workers block (an older scheduler): count the instances whose `ready` is true.
    doc = {"scheduler": {}, "instances": [{"id": "a", "role": "prefill", "ready": True},
                                          {"id": "b", "role": "decode", "ready": False}, "junk"]}
    state = layout_state(doc)
    assert (state.up, state.expected, state.source, state.by_role) == (1, None, "instances", {"prefill": 1})
    assert not state.complete(fallback_expected=2) and layout_state({}).up == 0


def test_counters_and_predictor_read_defensively() -> None:
    assert sum_instance_stat(_status(), "kv_handoffs_refused_role") is None  # nobody reports it
    assert sum_instance_stat(_status(refused=[2, 5]), "kv_handoffs_refused_role") == 7
    assert predictor_error(_status()) is None
    pred = predictor_error(_status(predictor={"mdape_pct": None, "samples": 0}))
    assert pred == {"mdape_pct": None, "samples": 0, "run_mdape_pct": None, "run_samples": None}
    pred = predictor_error(_status(predictor={"mdape_pct": 12.5, "samples": 40,
                                              "since_start": {"mdape_pct": 9.0, "samples": 90}}))
    assert pred == {"mdape_pct": 12.5, "samples": 40, "run_mdape_pct": 9.0, "run_samples": 90}


def test_recorder_takes_flips_from_the_scheduler() -> None:
    rec = StatusRecorder(wall_t0=1000.0)
    old = {"flip_id": 1, "instance": "decode-1", "from": "decode", "to": "prefill", "at": 990.0}  # warm-up
    flip = {"flip_id": 2, "instance": "decode-1", "from": "decode", "to": "prefill", "reason": "ttft", "at": 1010.0}
    back = {"flip_id": 3, "instance": "decode-1", "from": "prefill", "to": "decode", "reason": "tpot", "at": 1030.0}
    pred = {"mdape_pct": 20.0, "samples": 10, "since_start": {"mdape_pct": 15.0, "samples": 30}}
    rec.observe(_status(3, flips_total=1, recent=[old], refused=[1, 0]), 0.0)
    rec.observe(_status(2, flips_total=2, recent=[old, flip], refused=[1, 0]), 10.0)
    rec.observe(_status(3, flips_total=2, recent=[old, flip], refused=[1, 2],
                        roles={"prefill-0": "prefill", "decode-0": "decode", "decode-1": "prefill"}), 11.0)
    rec.observe(_status(3, flips_total=3, recent=[old, flip, back], refused=[1, 3], predictor=pred), 31.0)
    report = rec.report()
    assert report["flips"] == 2 and report["flips_source"] == "scheduler"  # counted from the first reading
    assert [(e["flip_id"], e["t"], e.get("reason")) for e in report["flip_events"]] == [(2, 10.0, "ttft"),
                                                                                       (3, 30.0, "tpot")]
    assert report["refused_handoffs_role"] == 3  # grew from 1 to 4 over the run
    assert report["ttft_predictor"]["run_mdape_pct"] == 15.0
    assert report["policy_last_reason"] == "prefill pressure 1.4"
    assert report["workers_up_min"] == 2 and report["layout_end"]["up"] == 3 and report["status_polls"] == 4


def test_recorder_falls_back_to_role_changes() -> None:
    rec = StatusRecorder()
    rec.observe(_status(), 0.0)
    rec.observe(_status(roles={"prefill-0": "prefill", "decode-0": "prefill"}), 1.0)
    report = rec.report()
    assert report["flips"] == 1 and report["flips_source"] == "roles"
    assert report["flip_events"] == [{"t": 1.0, "instance": "decode-0", "from": "decode", "to": "prefill"}]
    assert report["refused_handoffs_role"] is None and report["ttft_predictor"] is None
    empty = StatusRecorder().report()  # /status never answered
    assert empty["flips"] == 0 and empty["layout_end"] is None


async def _with_status(docs: list[dict], check) -> None:
    """Serve `docs` one per GET /status (the last one from then on) on 127.0.0.1 and run `check`."""
    calls = 0

    async def status(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.json_response(docs[min(calls, len(docs)) - 1])

    app = web.Application()
    app.router.add_get("/status", status)
    async with TestServer(app, host="127.0.0.1") as server:
        async with aiohttp.ClientSession() as session:
            await check(session, str(server.make_url("")).rstrip("/"))


def test_wait_for_layout_waits_for_every_worker() -> None:
    async def check(session: aiohttp.ClientSession, root: str) -> None:
        seen = await wait_for_layout(session, root, expected=3, timeout_s=5, interval_s=0.01)
        assert seen["up"] == 3 and seen["expected"] == 3 and seen["source"] == "scheduler"

    asyncio.run(_with_status([_status(0), _status(1), _status(2), _status(3)], check))


def test_wait_for_layout_counts_ready_instances_without_the_block() -> None:
    one = {"instances": [{"id": "decode-0", "role": "decode", "ready": True}]}
    two = {"instances": [{"id": "decode-0", "role": "decode", "ready": True},
                         {"id": "prefill-0", "role": "prefill", "ready": True}]}

    async def check(session: aiohttp.ClientSession, root: str) -> None:
        seen = await wait_for_layout(session, root, expected=2, timeout_s=5, interval_s=0.01)
        assert seen["up"] == 2 and seen["expected"] == 2 and seen["source"] == "instances"

    asyncio.run(_with_status([one, one, two], check))


def test_wait_for_layout_times_out_with_a_clear_error() -> None:
    async def check(session: aiohttp.ClientSession, root: str) -> None:
        with pytest.raises(BenchError, match=r"only 2 of 3 workers were up after 0.2 s"):
            await wait_for_layout(session, root, expected=None, timeout_s=0.2, interval_s=0.02)

    asyncio.run(_with_status([_status(2)], check))

    async def unreachable() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(BenchError, match="no answer"):
                await wait_for_layout(session, "http://127.0.0.1:9", expected=1, timeout_s=0.2, interval_s=0.05)

    asyncio.run(unreachable())
