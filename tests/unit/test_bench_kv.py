"""`xllm bench kv` without processes: the workload generator and the report math."""

from __future__ import annotations

import argparse

import pytest

from bench.kv import (
    KvRequest,
    add_arguments,
    distinct_prefix_pages,
    hit_deltas,
    make_workload,
    print_table,
    run,
    serve_argv,
    summarize_mode,
    workload_from_args,
)
from bench.client import RequestResult


def _is_prefix(a: list[int], b: list[int]) -> bool:
    return len(a) < len(b) and b[: len(a)] == a


def test_workload_is_seeded() -> None:
    a, b, c = make_workload(seed=3), make_workload(seed=3), make_workload(seed=4)
    assert [r.prompt_ids for r in a.requests] == [r.prompt_ids for r in b.requests]
    assert [r.prompt_ids for r in a.requests] != [r.prompt_ids for r in c.requests]


def test_chat_turns_resend_the_growing_conversation() -> None:
    w = make_workload(chats=3, turns=4, chat_context_len=20, user_len=5, reply_len=7, system_prompts=0,
                      shared_requests=0)
    assert len(w.rounds) == 4
    for c in range(3):
        turns = sorted((r for r in w.requests if r.kind == "chat" and r.group == c), key=lambda r: r.turn)
        assert [r.turn for r in turns] == [0, 1, 2, 3]
        assert len(turns[0].prompt_ids) == 25
        for prev, nxt in zip(turns, turns[1:]):
            assert _is_prefix(prev.prompt_ids, nxt.prompt_ids)
            assert len(nxt.prompt_ids) - len(prev.prompt_ids) == 7 + 5  # the reply, then the new message
    # Turn t of every chat is in round t: a chat's next turn only after its previous one.
    for t, rnd in enumerate(w.rounds):
        assert sorted(r.group for r in rnd) == [0, 1, 2] and all(r.turn == t for r in rnd)
    # Chats do not share a prefix with each other.
    firsts = [r.prompt_ids[:20] for r in w.rounds[0]]
    assert len({tuple(f) for f in firsts}) == 3


def test_shared_requests_reuse_few_system_prompts_and_spread_over_rounds() -> None:
    w = make_workload(chats=2, turns=4, system_prompts=3, system_prompt_len=40, shared_requests=10, question_len=6)
    shared = [r for r in w.requests if r.kind == "shared"]
    assert len(shared) == 10
    for r in shared:
        assert len(r.prompt_ids) == 46
    systems = {tuple(r.prompt_ids[:40]) for r in shared}
    assert len(systems) == 3
    assert len({tuple(r.prompt_ids) for r in shared}) == 10  # every question differs
    per_round = [sum(r.kind == "shared" for r in rnd) for rnd in w.rounds]
    assert sum(per_round) == 10 and max(per_round) - min(per_round) <= 1
    # Only shared requests: one round.
    only = make_workload(chats=0, system_prompts=2, shared_requests=5)
    assert len(only.rounds) == 1 and len(only.requests) == 5


def test_default_workload_outgrows_a_small_page_pool() -> None:
    w = make_workload()
    # 12MiB (the default pool) holds 17 float32 or 34 bfloat16 pages of the default model.
    assert distinct_prefix_pages(w, 16) > 2 * 34
    # ... yet the longest prompt (and its output) fits in the float32 pool.
    assert max(len(r.prompt_ids) for r in w.requests) + 8 <= 17 * 16
    assert w.prompt_tokens == sum(len(r.prompt_ids) for r in w.requests)


def test_distinct_prefix_pages_counts_shared_pages_once() -> None:
    shared = list(range(100, 132))  # two pages
    reqs = [KvRequest("shared", 0, i, shared + [200 + i] * 16) for i in range(3)]
    from bench.kv import Workload

    assert distinct_prefix_pages(Workload([reqs]), 16) == 2 + 3
    assert distinct_prefix_pages(Workload([[KvRequest("chat", 0, 0, [1] * 15)]]), 16) == 0


def test_make_workload_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        make_workload(chats=-1)
    with pytest.raises(ValueError):
        make_workload(chats=2, turns=0)


def test_hit_deltas_sum_workers_and_survive_a_restart() -> None:
    before = {"w0": {"prefix_hit_tokens": {"hbm": 10, "dram": 5, "ssd": 0}},
              "w1": {"prefix_hit_tokens": {"hbm": 100, "dram": 0, "ssd": 50}}}
    after = {"w0": {"prefix_hit_tokens": {"hbm": 30, "dram": 25, "ssd": 16}},
             # w1 restarted: its counters start from zero again
             "w1": {"prefix_hit_tokens": {"hbm": 7, "dram": 0, "ssd": 0}},
             "w2": {"prefix_hit_tokens": {"hbm": 1}}}  # new worker
    assert hit_deltas(before, after) == {"hbm": 20 + 7 + 1, "dram": 20, "ssd": 16}
    assert hit_deltas({}, {"w": {}}) == {"hbm": 0, "dram": 0, "ssd": 0}


def _result(ttft: float, out: int = 8, ok: bool = True) -> RequestResult:
    return RequestResult(ok=ok, error="" if ok else "HTTP 500: boom", output_tokens=out if ok else 0, ttft=ttft)


def test_summarize_mode_math() -> None:
    reqs = [KvRequest("chat", 0, 0, [1] * 100), KvRequest("chat", 0, 1, [1] * 200),
            KvRequest("shared", 0, 0, [2] * 300), KvRequest("shared", 0, 1, [2] * 400)]
    results = [(reqs[0], _result(0.1)), (reqs[1], _result(0.2)), (reqs[2], _result(0.3)),
               (reqs[3], _result(0.0, ok=False))]
    s = summarize_mode(results, {"hbm": 250, "dram": 100, "ssd": 50}, wall_s=2.0, extra={"x": 1})
    assert s["requests"] == 4 and s["completed"] == 3 and s["failed"] == 1
    assert s["ttft_ms"]["p50"] == pytest.approx(200) and s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["ttft_ms"]["p90"] == pytest.approx(280)  # linear interpolation between 200 and 300
    assert s["prompt_tokens"] == 1000 and s["output_tokens"] == 24
    assert s["hit_rate"] == pytest.approx({"hbm": 0.25, "dram": 0.1, "ssd": 0.05, "total": 0.4})
    assert s["hit_tokens"] == {"hbm": 250, "dram": 100, "ssd": 50}
    assert s["requests_per_s"] == pytest.approx(1.5) and s["prompt_tok_per_s"] == pytest.approx(500)
    assert s["output_tok_per_s"] == pytest.approx(12)
    assert s["by_kind"]["chat"] == {"requests": 2, "ttft_ms_p50": pytest.approx(150), "ttft_ms_mean": pytest.approx(150)}
    assert s["by_kind"]["shared"]["requests"] == 2
    assert s["errors"] == ["HTTP 500: boom"] and s["x"] == 1


def test_summarize_mode_with_nothing_completed() -> None:
    s = summarize_mode([(KvRequest("chat", 0, 0, [1] * 10), _result(0, ok=False))], {}, wall_s=0.0)
    assert s["completed"] == 0 and s["ttft_ms"] == {"p50": None, "p90": None, "mean": None}
    assert s["hit_rate"]["total"] == 0.0
    assert summarize_mode([], {}, 1.0)["hit_rate"]["hbm"] == 0.0


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_serve_argv_per_mode() -> None:
    args = _args("--kv-cache-memory", "16MiB", "--kvstore-dram", "8MiB", "--workers", "2",
                 "--serve-arg", "--dtype float32")
    on = serve_argv(args, "tiers-on", 9000, "/tmp/kv")
    off = serve_argv(args, "tiers-off", 9000, None)
    assert on[on.index("--kvstore-dir") + 1] == "/tmp/kv" and on[on.index("--kvstore-dram") + 1] == "8MiB"
    assert "--kvstore-dir" not in off and "--kvstore-dram" not in off
    for argv in (on, off):
        assert argv[argv.index("--kv-cache-memory") + 1] == "16MiB"
        assert argv[argv.index("--workers") + 1] == "2" and argv[-2:] == ["--dtype", "float32"]


def test_workload_from_args_and_bad_modes(capsys) -> None:
    args = _args("--chats", "2", "--turns", "3", "--shared-requests", "5", "--seed", "9")
    w = workload_from_args(args)
    assert len(w.requests) == 2 * 3 + 5 and w.params["seed"] == 9
    assert run(_args("--modes", "fast")) == 2
    assert "--modes" in capsys.readouterr().err
    assert run(_args("--chats", "0", "--shared-requests", "0")) == 2


def test_print_table(capsys) -> None:
    reqs = [KvRequest("chat", 0, 0, [1] * 100)]
    s = summarize_mode([(reqs[0], _result(0.5))], {"hbm": 10, "dram": 20, "ssd": 30}, 1.0)
    print_table({"tiers-on": s})
    out = capsys.readouterr().out
    assert "tiers-on" in out and "10.0/20.0/30.0 (60.0)" in out and "500/500/500" in out
