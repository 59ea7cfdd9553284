"""What `xllm bench soak` concludes from its samples and outcomes: error counts by kind, used KV
pages and worker RSS over time, and whether they are flat (no leak). Pure functions, plus the
printed table and the optional chart."""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

from bench.soak_workload import Outcome

__all__ = ["Sample", "count_outcomes", "pages_verdict", "rss_verdict", "slope_per_1k", "print_summary",
           "write_plot"]

MIB = 1 << 20
# One color per worker: the benchmarks' blue first, then distinct ones.
_COLORS = ("#1f5bb4", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d")


@dataclass
class Sample:
    """One look at the server: seconds since the load began, requests finished so far, used KV
    pages and RSS (bytes) per instance."""

    t: float
    done: int
    used_pages: dict[str, int] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def count_outcomes(outcomes: list[Outcome], limit: int = 10) -> dict:
    """Per kind: how many were sent, by HTTP status ("none" for no response), how many did not get
    what their kind expects; plus the first `limit` distinct problems and the 5xx total."""
    by_kind: dict[str, dict] = {}
    problems: list[str] = []
    for o in outcomes:
        entry = by_kind.setdefault(o.kind, {"sent": 0, "status": Counter(), "unexpected": 0, "variants": Counter()})
        entry["sent"] += 1
        entry["status"][str(o.status) if o.status is not None else "none"] += 1
        entry["variants"][o.variant] += 1
        if not o.ok:
            entry["unexpected"] += 1
            if o.problem not in problems and len(problems) < limit:
                problems.append(f"[{o.kind}/{o.variant}] {o.problem}")
    for entry in by_kind.values():
        entry["status"] = dict(sorted(entry["status"].items()))
        entry["variants"] = dict(sorted(entry["variants"].items()))
    return {
        "by_kind": dict(sorted(by_kind.items())),
        "sent": len(outcomes),
        "unexpected": sum(1 for o in outcomes if not o.ok),
        "server_errors_5xx": sum(1 for o in outcomes if o.status is not None and o.status >= 500),
        "no_response": sum(1 for o in outcomes if o.status is None),
        "malformed_not_4xx": sum(1 for o in outcomes if o.kind == "malformed" and not o.ok),
        "problems": problems,
    }


def pages_verdict(idle_before: dict[str, int], after: dict[str, int], peak_total: int) -> dict:
    """Used pages once idle again, per instance, against the idle level before the load: flat when
    no instance holds more than it did."""
    grown = {i: after.get(i, 0) - idle_before.get(i, 0) for i in sorted(set(idle_before) | set(after))}
    return {
        "idle_before": idle_before, "idle_after": after, "peak_total": peak_total,
        "leaked": {i: d for i, d in grown.items() if d > 0},
        "back_to_idle": all(d <= 0 for d in grown.values()),
    }


def slope_per_1k(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (requests done, value) points, per 1000 requests; None with fewer
    than two distinct x values."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    return 1000 * sxy / sxx


def rss_verdict(start: dict[str, int], end: dict[str, int], samples: list[Sample], tolerance_mib: float) -> dict:
    """RSS per worker: its growth from the post-warm-up baseline to the end, and over the second
    half of the requests (from the first sample with at least half of them done to the end), with
    the trend there (MiB per 1000 requests).

    Judged on the second half: a worker's first requests touch memory it keeps for good (KV pool
    pages it had never used, allocator arenas, caches that fill to their bound), which is growth
    but no leak; a leak keeps growing with the requests. Flat when every worker grew by at most
    `tolerance_mib` over the second half (None when no worker could be measured). A worker whose
    pid changed (restarted) is reported, not judged."""
    per_worker: dict[str, dict] = {}
    total = max((s.done for s in samples), default=0)
    for name in sorted(set(start) & set(end)):
        growth = (end[name] - start[name]) / MIB
        half = [s for s in samples if s.done >= total / 2 and name in s.rss]
        mid = half[0].rss[name] if half else start[name]
        late = (end[name] - mid) / MIB
        per_worker[name] = {"start_mib": start[name] / MIB, "mid_mib": mid / MIB, "end_mib": end[name] / MIB,
                            "growth_mib": growth,
                            "growth_pct": 100 * growth * MIB / start[name] if start[name] else None,
                            "second_half_growth_mib": late,
                            "trend_mib_per_1k_requests": slope_per_1k([(s.done, s.rss[name] / MIB) for s in half]),
                            "flat": late <= tolerance_mib}
    return {"tolerance_mib": tolerance_mib, "workers": per_worker,
            "not_judged": sorted(set(start) ^ set(end)),
            # None: no worker's RSS could be read (a server on another host), nothing to judge.
            "flat": all(w["flat"] for w in per_worker.values()) if per_worker else None}


def print_summary(doc: dict) -> None:
    counts, pages, rss = doc["counts"], doc["pages"], doc["rss"]
    print(f"soak: {counts['sent']} requests in {doc['duration_s']:.1f} s ({doc['requests_per_s']:.1f} req/s), "
          f"{counts['unexpected']} unexpected, {counts['server_errors_5xx']} 5xx, {counts['no_response']} without "
          f"a response", flush=True)
    for kind, entry in counts["by_kind"].items():
        print(f"  {kind:<10} sent {entry['sent']:>6}  status {entry['status']}  unexpected {entry['unexpected']}")
    print(f"  KV pages: idle before {pages['idle_before']}, after {pages['idle_after']}, peak {pages['peak_total']} "
          f"-> {'back to idle' if pages['back_to_idle'] else 'LEAKED ' + str(pages['leaked'])}")
    for name, w in rss["workers"].items():
        trend = w["trend_mib_per_1k_requests"]
        print(f"  RSS {name}: {w['start_mib']:.0f} -> {w['mid_mib']:.0f} (half) -> {w['end_mib']:.0f} MiB; second half "
              f"{w['second_half_growth_mib']:+.1f} MiB, trend {'-' if trend is None else format(trend, '+.2f')} MiB/1k "
              f"req: {'flat' if w['flat'] else 'GREW'} (tolerance {rss['tolerance_mib']:g} MiB)")
    if rss["not_judged"]:
        print(f"  RSS not judged (restarted or gone): {rss['not_judged']}")
    for problem in counts["problems"]:
        print(f"    problem: {problem}", file=sys.stderr)


def write_plot(path: str, doc: dict) -> None:
    """Two panels over requests done: each worker's RSS growth over its baseline (MiB) against the
    tolerance, and the used KV pages of all workers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from bench.chart import LINE_COLOR

    samples = doc["samples"]
    fig = Figure(figsize=(7.2, 6.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_rss, ax_pages = fig.subplots(2, 1, sharex=True)
    workers = sorted({name for s in samples for name in s["rss"]})
    for k, name in enumerate(workers):
        pts = [(s["done"], s["rss"][name] / MIB) for s in samples if name in s["rss"]]
        # Growth over the baseline, not the absolute RSS: a leak is a slope of a few MiB on top
        # of gigabytes, invisible on an axis that starts at zero.
        ax_rss.plot([x for x, _ in pts], [y - pts[0][1] for _, y in pts], marker=".",
                    label=f"{name} (baseline {pts[0][1]:.0f} MiB)", color=_COLORS[k % len(_COLORS)])
        # What the verdict allows: from the half-way sample, `tolerance` more by the end.
        half = [(x, y) for x, y in pts if x >= pts[-1][0] / 2]
        tolerance = doc.get("rss", {}).get("tolerance_mib")
        if half and tolerance is not None:
            ax_rss.hlines(half[0][1] - pts[0][1] + tolerance, half[0][0], pts[-1][0], colors=_COLORS[k % len(_COLORS)],
                          linestyles="dashed", linewidth=1, label=f"{name}: half-way + {tolerance:g} MiB allowed")
    ax_rss.set_ylabel("worker RSS growth (MiB)")
    ax_rss.legend(loc="lower right", fontsize="small")
    ax_rss.set_title(f"xllm bench soak: {doc['counts']['sent']} requests, concurrency {doc['concurrency']}")
    ax_pages.plot([s["done"] for s in samples], [sum(s["used_pages"].values()) for s in samples], color=LINE_COLOR,
                  marker=".", label="used KV pages (all workers)")
    ax_pages.set_ylabel("used KV pages")
    ax_pages.set_xlabel("requests done")
    ax_pages.set_ylim(bottom=0)
    ax_pages.legend(loc="upper right", fontsize="small")
    for ax in (ax_rss, ax_pages):
        ax.grid(True, color="#d7d7d7", linewidth=0.8)
    fig.savefig(path, format="png")
