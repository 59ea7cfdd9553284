"""The batch scheduler on its own: budgets, chunking, priorities, preemption by recompute.

Model compute is replaced by its effect on a sequence (tokens computed, one token appended
when a chunk reaches the end), which is all the scheduler can observe.
"""

from common.engine.block_manager import BlockManager
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import BatchScheduler
from common.engine.sequence import Priority, Sequence, SequenceStatus


def make_seq(rid: str, prompt_len: int, priority=Priority.ONLINE, max_tokens=8, arrival=0.0, base=0) -> Sequence:
    return Sequence(
        request_id=rid, prompt_ids=[base + i % 50 for i in range(prompt_len)],
        params=SamplingParams(temperature=0.0, max_tokens=max_tokens), max_tokens=max_tokens,
        priority=priority, arrival_time=arrival,
    )


def fake_step(sched: BatchScheduler, bm: BlockManager):
    batch = sched.schedule()
    for item in batch.items:
        seq = item.seq
        samples = item.samples
        seq.num_computed += item.num_new_tokens
        bm.commit(seq.seq_id, seq.token_ids, seq.num_computed)
        if samples:
            seq.token_ids.append(7)
            if seq.num_output_tokens >= seq.max_tokens:
                seq.status = SequenceStatus.FINISHED
                sched.remove(seq)
    bm.check_integrity()
    return batch


def test_chunked_prefill_mixes_with_decodes_under_budget():
    bm = BlockManager(num_pages=64, page_size=4)
    sched = BatchScheduler(bm, max_num_seqs=8, max_num_batched_tokens=16)
    short = make_seq("short", 3)
    sched.add(short)
    fake_step(sched, bm)  # prefill of the short prompt
    long = make_seq("long", 40, arrival=1.0, base=100)
    sched.add(long)
    chunks = []
    while long.num_computed < long.num_tokens - 1 or long.num_output_tokens == 0:
        batch = fake_step(sched, bm)
        assert batch.num_tokens <= 16
        sizes = {item.seq.request_id: item.num_new_tokens for item in batch.items}
        if "short" in sizes:
            assert sizes["short"] == 1  # the decode rides along with the prefill chunk
        chunks.append(sizes.get("long", 0))
        if long.num_output_tokens:
            break
    assert sum(chunks) == 40 and max(chunks) == 15  # 16-token budget minus the decode


def test_online_is_admitted_before_earlier_offline():
    bm = BlockManager(num_pages=64, page_size=4)
    sched = BatchScheduler(bm, max_num_seqs=1, max_num_batched_tokens=64)
    off = make_seq("off", 5, Priority.OFFLINE, arrival=0.0)
    on = make_seq("on", 5, Priority.ONLINE, arrival=1.0)
    sched.add(off)
    sched.add(on)
    batch = sched.schedule()
    assert [item.seq.request_id for item in batch.items] == ["on"]


def test_fcfs_inside_a_class():
    bm = BlockManager(num_pages=64, page_size=4)
    sched = BatchScheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq(f"r{i}", 5, arrival=float(i), base=i * 10) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [item.seq.request_id for item in batch.items] == ["r0", "r1"]


def test_preemption_by_recompute_keeps_outputs_and_frees_pages():
    bm = BlockManager(num_pages=6, page_size=4, enable_prefix_cache=False)
    sched = BatchScheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a = make_seq("a", 7, arrival=0.0, max_tokens=9, base=0)
    b = make_seq("b", 7, Priority.OFFLINE, arrival=1.0, max_tokens=9, base=100)
    sched.add(a)
    sched.add(b)
    preempted = []
    for _ in range(200):
        if not sched.has_work():
            break
        batch = fake_step(sched, bm)
        preempted.extend(s.request_id for s in batch.preempted)
    assert not sched.has_work()
    assert "b" in preempted and "a" not in preempted  # the offline, newer sequence yields
    assert a.num_output_tokens == 9 and b.num_output_tokens == 9
    assert b.num_preemptions >= 1
    assert bm.num_used_pages == 0


def test_remove_frees_pages_at_once():
    bm = BlockManager(num_pages=16, page_size=4)
    sched = BatchScheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    s = make_seq("x", 10)
    sched.add(s)
    fake_step(sched, bm)
    assert bm.num_used_pages > 0
    sched.remove(s)
    assert bm.num_used_pages == 0
    bm.check_integrity()


def test_online_request_preempts_running_offline_when_pages_run_out():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_cache=False)
    sched = BatchScheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    offline = [make_seq(f"off{i}", 11, Priority.OFFLINE, arrival=float(i), max_tokens=20, base=10 * i)
               for i in range(2)]
    for s in offline:
        sched.add(s)
    fake_step(sched, bm)  # both offline prompts run: 6 of 8 pages
    online = make_seq("on", 11, Priority.ONLINE, arrival=5.0, max_tokens=3, base=500)
    sched.add(online)
    batch = fake_step(sched, bm)
    assert [s.request_id for s in batch.preempted] == ["off1"]  # the newest offline yields
    assert online in [item.seq for item in batch.items]
    for _ in range(200):
        if not sched.has_work():
            break
        fake_step(sched, bm)
    assert online.num_output_tokens == 3
    assert all(s.num_output_tokens == 20 for s in offline)
    assert bm.num_used_pages == 0


def test_online_request_takes_a_batch_slot_from_offline():
    bm = BlockManager(num_pages=64, page_size=4)
    sched = BatchScheduler(bm, max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(2):
        sched.add(make_seq(f"off{i}", 5, Priority.OFFLINE, arrival=float(i), max_tokens=30, base=10 * i))
    fake_step(sched, bm)
    sched.add(make_seq("on", 5, Priority.ONLINE, arrival=9.0, max_tokens=2, base=300))
    batch = fake_step(sched, bm)
    assert "on" in [item.seq.request_id for item in batch.items]
    assert [s.request_id for s in batch.preempted] == ["off1"]
    assert sched.num_running <= 2
