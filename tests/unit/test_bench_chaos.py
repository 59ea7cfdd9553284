"""The pure parts of `xllm bench chaos`: its flags and kill schedule, the stream record's wire
checks, the token comparison, which streams a kill hit, the metrics arithmetic, the chart."""

from __future__ import annotations

import argparse

import pytest

from bench import chaos
from bench.chaos_report import (Kill, affected_by, check_references, holds, latency_stats, metrics_delta,
                                recovery_s, write_plot)
from bench.chaos_stream import StreamRecord, _take_event, compare_tokens, greedy_body
from bench.server_watch import MetricSample, histogram_quantile, metric_total


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chaos.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags():
    args = _parse("--duration", "60", "--kill-every", "15", "--seed", "3", "--kill-scheduler")
    assert (args.duration, args.kill_every, args.seed, args.kill_scheduler, args.workers) == (60, 15, 3, True, 3)
    for bad in (["--duration", "0"], ["--kill-every", "-1"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            _parse(*bad)
    argv = chaos.serve_argv(_parse("--port", "9100", "--serve-arg", "--max-migrations 5"))
    assert argv[argv.index("--workers") + 1] == "3" and argv[argv.index("--port") + 1] == "9100"
    assert argv[-2:] == ["--max-migrations", "5"]


def test_kill_schedule_is_seeded_and_inside_the_run():
    a = chaos.kill_schedule(60, 15, seed=1, kill_scheduler=False)
    assert a == chaos.kill_schedule(60, 15, seed=1, kill_scheduler=False)
    assert a != chaos.kill_schedule(60, 15, seed=2, kill_scheduler=False)
    assert [target for _, target in a] == ["worker"] * 3
    for k, (t, _) in enumerate(a, start=1):
        assert abs(t - 15 * k) <= 15 / 4
    b = chaos.kill_schedule(60, 15, seed=1, kill_scheduler=True)
    assert [target for _, target in b].count("scheduler") == 1
    assert all(0 < t < 60 for t, _ in b) and b == sorted(b)
    assert chaos.kill_schedule(10, 15, seed=0, kill_scheduler=False) == []


def test_prompts_are_seeded():
    assert chaos.make_prompts(4, 1) == chaos.make_prompts(4, 1) != chaos.make_prompts(4, 2)
    body = greedy_body("m", "hi", 8)
    assert body["temperature"] == 0 and body["ignore_eos"] and body["logprobs"] == 0 and body["stream"]


def _event(tokens: list[str], offsets: list[int], **extra) -> dict:
    logprobs = {"tokens": tokens, "text_offset": offsets}
    return {"id": "cmpl-1", "choices": [{"text": "".join(tokens), "logprobs": logprobs, **extra}]}


def test_stream_record_checks_offsets():
    rec = StreamRecord(0)
    offset = _take_event(rec, _event(["Hel", "lo"], [0, 3]), 1.0, 0)
    offset = _take_event(rec, _event([" you"], [5]), 2.0, offset)
    assert (rec.tokens, rec.text, rec.token_times, rec.wire_problems, rec.response_id) == (
        ["Hel", "lo", " you"], "Hello you", [1.0, 1.0, 2.0], [], "cmpl-1")
    _take_event(rec, _event(["!"], [5]), 3.0, offset)  # an event sent twice would restart at an old offset
    assert rec.wire_problems == ["token 3 at text offset 5, expected 9"]


def test_compare_tokens():
    want = list("abcdefgh")
    assert compare_tokens(list("abcdefgh"), want) == "equal"
    assert compare_tokens(list("abccdefg"), want) == "repeated token at index 3"
    assert compare_tokens(list("abdefgh"), want) == "skipped token at index 2"
    assert compare_tokens(list("abXdefgh"), want).startswith("diverged at token 2")
    assert compare_tokens(list("abc"), want) == "short: 3 of 8 tokens"
    assert compare_tokens(list("abcdefghi"), want).startswith("long")


def _rec(i: int, start: float, times: list[float], rid: str, ok: bool = True) -> StreamRecord:
    return StreamRecord(i, start=start, end=times[-1] if times else start, response_id=rid, ok=ok,
                        tokens=["x"] * len(times), token_times=times)


def test_which_streams_a_kill_hit():
    records = [_rec(0, 0, [1, 2, 9, 10], "cmpl-a"), _rec(1, 0, [1, 2, 3, 4, 5.5], "cmpl-b"),
               _rec(2, 6, [7, 8], "cmpl-c"), _rec(3, 0, [1, 2.5], "cmpl-d")]
    kill = Kill(t=1, at=2.6, target="worker", instance="w0", pid=1, held=["cmpl-a~1", "cmpl-zz"])
    assert affected_by(records, kill, gap_threshold_s=1.0) == [0]
    for unknown in (None, []):  # the status did not say: the stream whose next token came late
        kill.held = unknown
        assert affected_by(records, kill, gap_threshold_s=1.0) == [0]
    assert recovery_s(records[0], 2.6) == pytest.approx(6.4)
    assert recovery_s(records[3], 2.6) is None
    assert holds("cmpl-a", "cmpl-a") and holds("cmpl-a-0", "cmpl-a") and not holds("cmpl-ab", "cmpl-a")
    assert not holds("x", "")


def test_latency_stats_and_references():
    assert latency_stats([]) == {"n": 0, "p50": None, "max": None, "mean": None}
    assert latency_stats([3.0, 1.0, 2.0]) == {"n": 3, "p50": 2.0, "max": 3.0, "mean": 2.0}
    good = StreamRecord(0, ok=True, tokens=["a", "b"])
    bad = StreamRecord(1, ok=True, tokens=["a", "a", "b"])
    failed = StreamRecord(0, ok=False, error="boom")
    check = check_references([good, bad, failed], {0: ["a", "b"], 1: ["a", "b"]})
    assert (check["checked"], check["equal"], check["mismatched"], check["all_equal"]) == (2, 1, 1, False)
    assert check_references([good], {0: ["a", "b"]})["all_equal"]


def test_metrics_arithmetic():
    before = [MetricSample("xllm_requests_migrated_total", {"reason": "worker_lost"}, 2.0)]
    after = [MetricSample("xllm_requests_migrated_total", {"reason": "worker_lost"}, 5.0),
             MetricSample("xllm_requests_migrated_total", {"reason": "scheduler_restart"}, 1.0),
             MetricSample("xllm_requests_migrated_created", {}, 123.0)]
    delta = metrics_delta(before, after)
    assert metric_total(delta, "xllm_requests_migrated_total") == 4.0
    assert metric_total(delta, "xllm_requests_migrated_total", reason="worker_lost") == 3.0
    assert all(not s.name.endswith("_created") for s in delta)
    hist = [MetricSample("h_bucket", {"le": le}, c) for le, c in (("1.0", 0), ("2.0", 4), ("4.0", 8), ("+Inf", 8))]
    assert histogram_quantile(hist, "h", 0.5) == pytest.approx(2.0)
    assert histogram_quantile(hist, "h", 0.75) == pytest.approx(3.0)
    assert histogram_quantile([MetricSample("h_bucket", {"le": "+Inf"}, 0)], "h", 0.5) is None


def test_plot_is_written(tmp_path):
    doc = {"tokens_per_s": [0, 5, 8, 2, 7], "workers": 3, "kill_every_s": 2.0, "seed": 0,
           "kills": [{"t": 2.2, "target": "worker", "instance": "worker-1", "skipped": ""},
                     {"t": 3.0, "target": "worker", "instance": "-", "skipped": "spared"}]}
    path = tmp_path / "chaos.png"
    write_plot(str(path), doc)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
