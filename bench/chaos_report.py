"""What `xllm bench chaos` concludes from its stream records, kills and metrics: which streams
each kill hit, how long they took to recover, what a migration cost in latency, whether every
greedy text equals its no-fault reference. Pure functions, plus the printed summary and chart."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from bench.chaos_stream import StreamRecord, compare_tokens
from bench.server_watch import MetricSample
from bench.stats import percentile

__all__ = ["Kill", "holds", "affected_by", "recovery_s", "latency_stats", "metrics_delta", "check_references",
           "print_summary", "write_plot"]


@dataclass
class Kill:
    """One SIGKILL: when (seconds since the load began, and the perf_counter value), what, and
    the requests the victim held just before (from `/status`; None when it did not say)."""

    t: float
    at: float
    target: str  # "worker" or "scheduler"
    instance: str
    pid: int
    held: list[str] | None = None
    affected: list[int] = field(default_factory=list)  # indexes into the records
    recovery_s: list[float] = field(default_factory=list)
    skipped: str = ""  # why no process was killed at this point

    def to_json(self) -> dict:
        return {"t": self.t, "target": self.target, "instance": self.instance, "pid": self.pid,
                "held_requests": None if self.held is None else len(self.held), "affected_streams": len(self.affected),
                "recovery_s": self.recovery_s, "skipped": self.skipped}


def holds(held_id: str, response_id: str) -> bool:
    """Whether a request id the scheduler lists is (an attempt of) this response: the gateway's
    sub-requests are `<id>`, `<id>-<prompt>` and, once migrated, `<id>~<n>`."""
    return bool(response_id) and (held_id == response_id or held_id.startswith((response_id + "-", response_id + "~")))


def affected_by(records: list[StreamRecord], kill: Kill, gap_threshold_s: float) -> list[int]:
    """The streams a kill hit: in flight at the kill and, when `/status` listed requests on the
    victim, among them; otherwise (it did not say, or listed none: a scheduler restarted since does
    not know what was running before it) those whose next token came more than `gap_threshold_s`
    after the kill."""
    hit = []
    for i, rec in enumerate(records):
        if not rec.in_flight_at(kill.at) or (rec.token_times and rec.token_times[-1] <= kill.at):
            continue
        if kill.held:
            if any(holds(h, rec.response_id) for h in kill.held):
                hit.append(i)
        else:
            nxt = rec.first_token_after(kill.at)
            if nxt is None or nxt - kill.at > gap_threshold_s:
                hit.append(i)
    return hit


def recovery_s(rec: StreamRecord, kill_at: float) -> float | None:
    """Kill -> the stream's next token (None if it never got one)."""
    nxt = rec.first_token_after(kill_at)
    return None if nxt is None else nxt - kill_at


def latency_stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "max": None, "mean": None}
    s = sorted(values)
    return {"n": len(s), "p50": percentile(s, 0.5), "max": s[-1], "mean": sum(s) / len(s)}


def metrics_delta(before: list[MetricSample], after: list[MetricSample]) -> list[MetricSample]:
    """`after` minus `before` for every counter-like sample (a series absent before counts from 0)."""
    base = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in before}
    return [MetricSample(s.name, s.labels, s.value - base.get((s.name, tuple(sorted(s.labels.items()))), 0.0))
            for s in after if not s.name.endswith("_created")]


def check_references(records: list[StreamRecord], references: dict[int, list[str]]) -> dict:
    """Every finished stream's tokens against its prompt's no-fault reference, and its wire checks."""
    mismatches, wire = [], []
    equal = 0
    for i, rec in enumerate(records):
        if not rec.ok:
            continue
        verdict = compare_tokens(rec.tokens, references[rec.prompt_index])
        if verdict == "equal":
            equal += 1
        else:
            mismatches.append({"stream": i, "prompt": rec.prompt_index, "verdict": verdict})
        if rec.wire_problems:
            wire.append({"stream": i, "problems": rec.wire_problems[:3]})
    checked = sum(1 for r in records if r.ok)
    return {"checked": checked, "equal": equal, "mismatches": mismatches[:20], "mismatched": len(mismatches),
            "wire_problems": wire[:20], "all_equal": checked > 0 and equal == checked and not wire}


def _fmt(v: float | None, unit: str = " s") -> str:
    return "-" if v is None else f"{v:.2f}{unit}"


def print_summary(doc: dict) -> None:
    req, rec, mig, ref = doc["requests"], doc["recovery_s"], doc["migration"], doc["references_check"]
    print(f"chaos: {doc['duration_s']:.0f} s, {len(doc['kills'])} kill(s) "
          f"({sum(1 for k in doc['kills'] if not k['skipped'])} done), {req['finished']} requests finished, "
          f"{req['failed']} failed", flush=True)
    for k in doc["kills"]:
        what = k["skipped"] or (f"pid {k['pid']}, held {k['held_requests']}, hit {k['affected_streams']} stream(s), "
                                f"recovery {', '.join(f'{x:.2f}' for x in k['recovery_s']) or '-'} s")
        print(f"  t={k['t']:6.1f} s kill {k['target']} {k['instance']}: {what}")
    print(f"  recovery (kill -> next token of a migrated stream): p50 {_fmt(rec['p50'])}, max {_fmt(rec['max'])} "
          f"over {rec['n']} stream(s); server-side xllm_migration_seconds p50 {_fmt(mig['seconds_p50'])}, "
          f"mean {_fmt(mig['seconds_mean'])} over {mig['seconds_count']:.0f}")
    extra = doc["extra_latency_s"]
    print(f"  migrated streams' end-to-end: p50 {_fmt(extra['migrated_e2e']['p50'])} vs "
          f"{_fmt(extra['unaffected_e2e']['p50'])} unaffected (extra p50 {_fmt(extra['extra']['p50'])}, "
          f"max {_fmt(extra['extra']['max'])})")
    print(f"  migrations counted in /metrics: {mig['by_reason'] or 0}; failed after migration: {mig['failed']:.0f}")
    print(f"  greedy texts equal to the no-fault reference: {ref['equal']}/{ref['checked']}"
          f"{'' if ref['all_equal'] else ' -- MISMATCH'}; pages back to idle: {doc['pages']['back_to_idle']}")
    for m in ref["mismatches"][:5]:
        print(f"    stream {m['stream']} (prompt {m['prompt']}): {m['verdict']}", file=sys.stderr)
    for err in req["errors"]:
        print(f"    error: {err}", file=sys.stderr)


def write_plot(path: str, doc: dict) -> None:
    """Tokens per second received over the run (1 s bins), one vertical line per kill."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bench.chart import LINE_COLOR

    series = doc["tokens_per_s"]
    fig = Figure(figsize=(7.2, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(series)), series, color=LINE_COLOR, label="tokens/s received (all streams)")
    for k in doc["kills"]:
        if not k["skipped"]:
            color = "#c0392b" if k["target"] == "worker" else "#8e44ad"
            ax.axvline(k["t"], color=color, linestyle="--", linewidth=1)
            ax.annotate(f"kill {k['instance']}", (k["t"], max(series or [1]) * 0.95), rotation=90, fontsize="small",
                        color=color, xytext=(3, 0), textcoords="offset points", va="top")
    ax.set_xlabel("seconds since the load began")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.grid(True, color="#d7d7d7", linewidth=0.8)
    ax.set_title(f"xllm bench chaos: {doc['workers']} workers, kill every {doc['kill_every_s']:g} s, "
                 f"seed {doc['seed']}")
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, format="png")
