"""The Batch API's LMDB store and offline throttle (no server)."""

from __future__ import annotations

import asyncio

from services.gateway.batch.records import BatchRecord, FileRecord, LineResult
from services.gateway.batch.store import BatchStore
from services.gateway.batch.throttle import OfflineThrottle


def _batch(batch_id: str = "batch_1", total: int = 3) -> BatchRecord:
    return BatchRecord(id=batch_id, endpoint="/v1/completions", input_file_id="file-1", completion_window="24h",
                       status="in_progress", created_at=1, expires_at=10**10, total=total)


def test_a_line_is_committed_once_with_its_counts(tmp_path):
    store = BatchStore(str(tmp_path / "db"), map_size=64 << 20)
    store.put_batch(_batch())
    first = store.commit_result("batch_1", LineResult(index=1, custom_id="b", ok=True, status_code=200, body={}))
    assert first is not None and (first.completed, first.failed) == (1, 0)
    # the same line again (a resumed run racing a commit) changes nothing
    assert store.commit_result("batch_1", LineResult(index=1, custom_id="b", ok=False, error_code="x")) is None
    store.commit_result("batch_1", LineResult(index=0, custom_id="a", ok=False, error_code="bad", error_message="m"))
    batch = store.get_batch("batch_1")
    assert (batch.completed, batch.failed) == (1, 1)
    assert store.finished_indices("batch_1") == {0, 1}
    assert [r.custom_id for r in store.results("batch_1")] == ["a", "b"]  # input order
    # another batch's keys do not leak into this one's range
    store.put_batch(_batch("batch_10"))
    store.commit_result("batch_10", LineResult(index=5, custom_id="z", ok=True, status_code=200, body={}))
    assert store.finished_indices("batch_1") == {0, 1}
    assert store.commit_result("batch_nope", LineResult(index=0, custom_id="q", ok=True)) is None
    store.close()


def test_state_survives_reopening(tmp_path):
    path = str(tmp_path / "db")
    store = BatchStore(path, map_size=64 << 20)
    store.put_file(FileRecord(id="file-1", filename="in.jsonl", purpose="batch", bytes=3, created_at=1), b"abc")
    store.put_batch(_batch())
    store.commit_result("batch_1", LineResult(index=2, custom_id="c", ok=True, status_code=200, body={"x": 1}))
    store.close()
    again = BatchStore(path, map_size=64 << 20)
    assert again.file_data("file-1") == b"abc"
    assert again.get_batch("batch_1").completed == 1
    assert [r.body for r in again.results("batch_1")] == [{"x": 1}]
    assert again.delete_file("file-1") and again.get_file("file-1") is None and again.file_data("file-1") is None
    again.close()


def test_line_rendering_is_openai_shaped():
    ok = LineResult(index=0, custom_id="a", ok=True, status_code=200, body={"id": "cmpl-1"}, request_id="cmpl-1")
    assert ok.as_openai_line() == {"id": "batch_req_cmpl-1", "custom_id": "a", "error": None,
                                   "response": {"status_code": 200, "request_id": "cmpl-1", "body": {"id": "cmpl-1"}}}
    bad = LineResult(index=3, custom_id="b", ok=False, error_code="batch_expired", error_message="late")
    assert bad.as_openai_line()["error"] == {"code": "batch_expired", "message": "late"}
    assert bad.as_openai_line()["response"] is None


def test_throttle_gives_room_to_online_and_backs_off_on_slow_steps():
    online = [0]
    throttle = OfflineThrottle(8, tpot_target_s=0.1, online_in_flight=lambda: online[0], poll_s=0.001)
    assert throttle.slots == 8
    online[0] = 3
    assert throttle.slots == 5  # each online request takes one offline slot back
    online[0] = 20
    assert throttle.slots == 0
    online[0] = 0
    assert throttle.slots == 8

    async def fill() -> int:
        taken = 0
        while await asyncio.wait_for(throttle.acquire(stop=lambda: taken >= 8), 1.0):
            taken += 1
        return taken

    assert asyncio.run(fill()) == 8 and throttle.in_flight == 8
    throttle.release(0.5)  # a slow step: the window halves
    assert throttle.window == 4.0 and throttle.decreases == 1
    throttle.release(0.5)  # not again within the same signal round trip
    assert throttle.window == 4.0
    for _ in range(6):
        throttle.release(0.01)  # fast steps: additive increase
    assert 4.0 < throttle.window < 8.0 and throttle.in_flight == 0
    online[0] = 50
    assert throttle.slots == 0 and not asyncio.run(throttle.acquire(stop=lambda: True))
