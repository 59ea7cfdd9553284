"""`xllm bench pd` over several seeds: each policy's mean and spread, the diagnosis of runs whose
numbers move without a flip, the comparison between policies, and the printed table.

A diagnosis states what was measured (failed or cancelled requests, how much of the layout was
up, warm-up failures, which SLO the completed requests missed, the offered vs target arrival rate,
the client's send lag, the predictor's error, the policy's last reason); it never guesses a cause.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

from bench.server_proc import fmt

__all__ = ["DIVERGENCE_PTS", "seed_entry", "error_entry", "spread", "mean_or_none", "seed_mdape", "aggregate_policy",
           "seed_facts", "diagnose", "compare_policies", "print_table"]

# Two seeds of one policy further apart than this (attainment points) get explained.
DIVERGENCE_PTS = 15.0
# A client that sent a request this late (ms) was itself short of CPU: worth saying.
_SEND_LAG_NOTE_MS = 250.0


def seed_entry(seed: int, summary: dict) -> dict:
    """One seed's full run summary, with its overall attainment at the top."""
    return {"seed": seed, "slo_attainment_pct": summary["overall"]["slo_attainment_pct"], **summary}


def error_entry(seed: int, error: str) -> dict:
    """A seed that produced no measurement (its server or layout never came up, ...)."""
    return {"seed": seed, "error": error}


def _numbers(values: Iterable[float | int | None]) -> list[float]:
    return [float(v) for v in values if v is not None]


def mean_or_none(values: Iterable[float | int | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    nums = _numbers(values)
    return statistics.fmean(nums) if nums else None


def spread(values: Iterable[float | int | None]) -> dict:
    """min, max and sample standard deviation (0 for one value) of the values that are not None."""
    nums = _numbers(values)
    if not nums:
        return {"min": None, "max": None, "stdev": None, "n": 0}
    return {"min": min(nums), "max": max(nums), "stdev": statistics.stdev(nums) if len(nums) > 1 else 0.0,
            "n": len(nums)}


def seed_mdape(entry: dict) -> float | None:
    """The predictor's MdAPE over the seed's whole run when the scheduler reports it, else over
    its recent window."""
    pred = entry.get("ttft_predictor") or {}
    return pred.get("run_mdape_pct") if pred.get("run_mdape_pct") is not None else pred.get("mdape_pct")


def _mean_summary(summaries: list[dict]) -> dict:
    pct = [s["slo_attainment_pct"] for s in summaries]
    tok = [s["output_tok_per_s"] for s in summaries]
    return {
        "slo_attainment_pct": mean_or_none(pct), "spread": spread(pct),
        "ttft_attainment_pct": mean_or_none(s["ttft_attainment_pct"] for s in summaries),
        "tpot_attainment_pct": mean_or_none(s["tpot_attainment_pct"] for s in summaries),
        "output_tok_per_s": mean_or_none(tok), "output_tok_per_s_spread": spread(tok),
        "requests": sum(s["requests"] for s in summaries), "completed": sum(s["completed"] for s in summaries),
        "failed": sum(s["failed"] for s in summaries),
    }


def aggregate_policy(policy: str, entries: list[dict], *, divergence_pts: float = DIVERGENCE_PTS) -> dict:
    """Mean and spread over a policy's seeds (overall and per phase), its flips, refused hand-offs
    and predictor error per seed, every seed's summary, and the diagnosis."""
    ok = [e for e in entries if "error" not in e]
    phase_count = min((len(e["phases"]) for e in ok), default=0)
    phases = [{"phase": ok[0]["phases"][i]["phase"], **_mean_summary([e["phases"][i] for e in ok])}
              for i in range(phase_count)]
    refused = [e.get("refused_handoffs_role") for e in ok]
    mdape = [seed_mdape(e) for e in ok]
    flips = [e["flips"] for e in ok]
    return {
        "policy": policy, "seeds_ok": len(ok), "seeds_total": len(entries),
        "overall": _mean_summary([e["overall"] for e in ok]) if ok else {"slo_attainment_pct": None,
                                                                           "spread": spread([])},
        "phases": phases,
        "flips": {"mean": mean_or_none(flips), "total": sum(flips), "per_seed": flips},
        "refused_handoffs_role": {"total": sum(int(r) for r in refused if r is not None)
                                  if any(r is not None for r in refused) else None, "per_seed": refused},
        "ttft_predictor_mdape_pct": {"mean": mean_or_none(mdape), "per_seed": mdape},
        "seeds": entries,
        "diagnosis": diagnose(policy, entries, divergence_pts=divergence_pts),
    }


def seed_facts(entry: dict) -> list[str]:
    """What was measured in one seed's run that bears on its attainment, one phrase each."""
    overall = entry["overall"]
    facts = [f"{entry.get('flips', 0)} flip(s)"]
    if overall["failed"]:
        cancelled = (overall.get("misses") or {}).get("cancelled", 0)
        first = f": {overall['errors'][0]}" if overall.get("errors") else ""
        facts.append(f"{overall['failed']} of {overall['requests']} requests failed ({cancelled} cancelled at the "
                     f"drain deadline){first}")
    if entry.get("warmup_failures"):
        facts.append(f"{entry['warmup_failures']} warm-up request(s) failed")
    start, end = entry.get("layout") or {}, entry.get("layout_end") or {}
    expected = start.get("expected") if start.get("expected") is not None else end.get("expected")
    if expected is not None:
        if start.get("up") is not None and start["up"] < expected:
            facts.append(f"only {start['up']} of {expected} workers up at the start")
        if end.get("up") is not None and end["up"] < expected:
            facts.append(f"{end['up']} of {expected} workers up at the end")
        low = entry.get("workers_up_min")
        if low is not None and low < expected and not entry.get("flips"):
            facts.append(f"workers up fell to {low} of {expected} during the run, with no flip")
    misses = overall.get("misses") or {}
    if overall["completed"]:
        facts.append(f"of {overall['completed']} completed: {misses.get('ttft_only', 0)} missed TTFT only, "
                     f"{misses.get('tpot_only', 0)} TPOT only, {misses.get('both', 0)} both")
    for ph in entry.get("phases") or []:
        pct, offered, target = ph.get("slo_attainment_pct"), ph.get("offered_rate"), ph.get("target_rate")
        fact = f"{ph['phase']} {fmt(pct, '.1f')} %"
        if offered is not None and target is not None:
            fact += f" at {offered:.2f} req/s offered for {target:.2f} targeted"
        lag = (ph.get("send_lag_ms") or {}).get("max")
        if lag is not None and lag > _SEND_LAG_NOTE_MS:
            fact += f", client sent up to {lag:.0f} ms late"
        facts.append(fact)
    mdape = seed_mdape(entry)
    if mdape is not None:
        pred = entry.get("ttft_predictor") or {}
        samples = pred.get("run_samples") if pred.get("run_mdape_pct") is not None else pred.get("samples")
        facts.append(f"TTFT predictor MdAPE {mdape:.1f} % over {fmt(samples)} samples")
    if entry.get("refused_handoffs_role"):
        facts.append(f"{entry['refused_handoffs_role']} hand-off(s) refused for the role")
    if entry.get("policy_last_reason"):
        facts.append(f"policy's last reason: {entry['policy_last_reason']}")
    return facts


def diagnose(policy: str, entries: list[dict], *, divergence_pts: float = DIVERGENCE_PTS) -> list[str]:
    """Lines explaining a policy's seeds: those with no result, every dynamic seed without a flip,
    and the lowest and highest seed when they are more than `divergence_pts` apart."""
    lines = [f"{policy} seed {e['seed']}: no result: {e['error']}" for e in entries if "error" in e]
    ok = [e for e in entries if "error" not in e]
    explained: set[int] = set()
    if policy == "dynamic":
        for e in ok:
            if not e.get("flips"):
                lines.append(f"dynamic seed {e['seed']} flipped nothing: " + "; ".join(seed_facts(e)))
                explained.add(e["seed"])
    scored = [e for e in ok if e["overall"]["slo_attainment_pct"] is not None]
    if len(scored) >= 2:
        lo = min(scored, key=lambda e: e["overall"]["slo_attainment_pct"])
        hi = max(scored, key=lambda e: e["overall"]["slo_attainment_pct"])
        gap = hi["overall"]["slo_attainment_pct"] - lo["overall"]["slo_attainment_pct"]
        if gap > divergence_pts:
            lines.append(f"{policy}: seeds differ by {gap:.1f} points (seed {lo['seed']} "
                         f"{lo['overall']['slo_attainment_pct']:.1f} %, seed {hi['seed']} "
                         f"{hi['overall']['slo_attainment_pct']:.1f} %)")
            for e in (lo, hi):
                if e["seed"] not in explained:
                    lines.append(f"{policy} seed {e['seed']}: " + "; ".join(seed_facts(e)))
                    explained.add(e["seed"])
    return lines


def compare_policies(runs: dict[str, dict]) -> list[dict]:
    """Mean attainment differences between the policies run, and whether their seeds' ranges are
    apart (every seed of one above every seed of the other): "outside the spread"."""
    out = []
    for a, b in (("dynamic", "static"), ("dynamic", "mixed"), ("static", "mixed")):
        if a not in runs or b not in runs:
            continue
        ra, rb = runs[a]["overall"], runs[b]["overall"]
        if ra["slo_attainment_pct"] is None or rb["slo_attainment_pct"] is None:
            continue
        sa, sb = ra["spread"], rb["spread"]
        out.append({"a": a, "b": b, "mean_diff_pts": ra["slo_attainment_pct"] - rb["slo_attainment_pct"],
                    "separated": sa["min"] > sb["max"] or sa["max"] < sb["min"]})
    return out


def _cell(summary: dict) -> str:
    mean, sp = summary.get("slo_attainment_pct"), summary.get("spread") or {}
    if mean is None:
        return "-"
    return f"{mean:.1f} ±{sp['stdev']:.1f} [{sp['min']:.0f}-{sp['max']:.0f}]"


def print_table(runs: dict[str, dict], comparisons: list[dict] | None = None) -> None:
    """One line per policy (mean ±stdev [min-max] of SLO attainment %, overall and per phase),
    then one per seed, then the comparisons and the diagnosis."""
    names = next((["all", *(p["phase"] for p in r["phases"])] for r in runs.values() if r["phases"]), ["all"])
    head = "".join(f"{'SLO % ' + n:<24}" for n in names)
    print(f"{'policy':<10}{'seeds':<7}{head}{'out tok/s':>11}{'flips':>7}{'MdAPE%':>8}{'failed':>8}")
    for policy, r in runs.items():
        cells = "".join(f"{_cell(s):<24}" for s in [r["overall"], *r["phases"]])
        print(f"{policy:<10}{str(r['seeds_ok']) + '/' + str(r['seeds_total']):<7}{cells}"
              f"{fmt(r['overall'].get('output_tok_per_s'), '.1f'):>11}{fmt(r['flips']['mean'], '.1f'):>7}"
              f"{fmt(r['ttft_predictor_mdape_pct']['mean'], '.1f'):>8}{fmt(r['overall'].get('failed')):>8}")
    print()
    print(f"{'policy':<10}{'seed':>5}" + "".join(f"{'SLO% ' + n:>18}" for n in names)
          + f"{'TTFT p90 ms':>12}{'TPOT p90 ms':>12}{'tok/s':>8}{'flips':>7}{'refused':>9}{'MdAPE%':>8}{'failed':>8}")
    for policy, r in runs.items():
        for e in r["seeds"]:
            if "error" in e:
                print(f"{policy:<10}{e['seed']:>5}  no result: {e['error']}")
                continue
            o = e["overall"]
            cells = "".join(f"{fmt(s['slo_attainment_pct'], '.1f'):>18}" for s in [o, *e["phases"]])
            print(f"{policy:<10}{e['seed']:>5}{cells}{fmt(o['ttft_ms']['p90']):>12}{fmt(o['tpot_ms']['p90']):>12}"
                  f"{fmt(o['output_tok_per_s'], '.1f'):>8}{e['flips']:>7}{fmt(e.get('refused_handoffs_role')):>9}"
                  f"{fmt(seed_mdape(e), '.1f'):>8}{o['failed']:>8}")
    for c in comparisons or []:
        print(f"{c['a']} - {c['b']}: {c['mean_diff_pts']:+.1f} points of SLO attainment (mean over seeds), "
              f"{'outside' if c['separated'] else 'within'} the spread")
    for r in runs.values():
        for line in r["diagnosis"]:
            print(f"diagnosis: {line}")
