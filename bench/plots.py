"""Each benchmark's `--plot PNG`: its results document turned into `bench.chart` panels.

One function per bench, taking the document that bench writes with `--json`, so a plot can also
be redrawn later from a saved JSON file. matplotlib is imported only here and in `bench.chart`,
and only when a plot is asked for.
"""

from __future__ import annotations

from bench.chart import Bars, Curves, Series, bar_chart, curves_chart, ensure_parent

__all__ = ["serve_plot", "offline_plot", "kv_plot", "quality_plot", "pd_plot"]


def serve_plot(path: str, doc: dict) -> bool:
    """Throughput-latency curves: output tok/s against TTFT and against TPOT, p50 and p99, one point
    per concurrency level. False (nothing written) when no level completed a request."""
    points = [e for e in doc["results"] if e["completed"]]
    if not points:
        return False
    labels = [f"c={e['concurrency']}" for e in points]
    tput = [e["output_throughput"] for e in points]
    panels = [
        Curves(f"output tok/s vs {name}", f"{name} (ms)", "output tok/s",
               [Series(f"{name} {q}", [e[key][q] for e in points], tput, labels) for q in ("p50", "p99")])
        for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"))
    ]
    ensure_parent(path)
    curves_chart(path, panels, title=f"{doc['model']}: {doc['endpoint']} in={doc['prompt_len']} "
                                     f"out={doc['output_len']}")
    return True


def offline_plot(path: str, result: dict) -> bool:
    """Two panels over the run's time: output tok/s, and requests in flight."""
    points = result.get("timeline") or []
    ts = [p["t_s"] for p in points]
    ensure_parent(path)
    curves_chart(path, [
        Curves("output tok/s over the run", "seconds", "output tok/s",
               [Series("output tok/s", ts, [p["output_tok_per_s"] for p in points], markers=False)]),
        Curves("requests in flight", "seconds", "requests",
               [Series(f"in flight (max {result['concurrency']})", ts, [p["in_flight"] for p in points],
                       markers=False)]),
    ], title=f"offline bench: C={result['concurrency']} N={result['num_requests']} P={result['prompt_len']} "
             f"O={result['output_len']}, {result['output_tokens_per_s']:.1f} output tok/s")
    return True


def kv_plot(path: str, doc: dict) -> bool:
    """Per mode (tiers on / off): TTFT p50/p90/mean, prefix hit rate per tier, throughput."""
    runs = doc.get("runs") or {}
    if not runs:
        return False
    ttft_keys = ("p50", "p90", "mean")
    tiers = ("hbm", "dram", "ssd", "total")
    ensure_parent(path)
    bar_chart(path, [
        Bars("TTFT", "ms", list(ttft_keys), {m: [r["ttft_ms"].get(k) for k in ttft_keys] for m, r in runs.items()},
             value_format="{:.0f}"),
        Bars("prefix hit rate by tier", "% of prompt tokens", list(tiers),
             {m: [100 * r["hit_rate"][t] for t in tiers] for m, r in runs.items()}, value_format="{:.1f}"),
        Bars("throughput", "tokens/s", ["prompt tok/s", "output tok/s"],
             {m: [r["prompt_tok_per_s"], r["output_tok_per_s"]] for m, r in runs.items()}, value_format="{:.0f}"),
    ], title=f"bench kv: {doc.get('workload', {}).get('requests', '?')} requests, "
             f"{doc.get('workers', '?')} worker(s), pages {doc.get('kv_cache_memory', '?')}")
    return True


def quality_plot(path: str, report: dict) -> bool:
    """Per numeric path against fp32: KL, top-1 agreement, perplexity."""
    modes = report.get("modes") or {}
    if not modes:
        return False
    names = list(modes)
    ensure_parent(path)
    bar_chart(path, [
        Bars("KL(fp32 || mode) per token", "nats", names, {"KL": [modes[n]["kl_from_fp32"] for n in names]},
             value_format="{:.2g}"),
        Bars("top-1 agreement with fp32", "%", names,
             {"top-1": [100 * modes[n]["top1_agreement_with_fp32"] for n in names]}, value_format="{:.2f}"),
        Bars("perplexity", "perplexity", names, {"perplexity": [modes[n]["perplexity"] for n in names]},
             value_format="{:.3f}"),
    ], title=f"bench quality: {report.get('tokens', '?')} tokens")
    return True


def pd_plot(path: str, doc: dict) -> bool:
    """Per policy: SLO attainment and output tok/s overall and per phase (mean over seeds, error
    bar = standard deviation over seeds), flips and predictor error."""
    runs = doc.get("runs") or {}
    if not runs:
        return False
    first = next(iter(runs.values()))
    categories = ["overall", *[p["phase"] for p in first.get("phases") or []]]

    def per_phase(run: dict, key: str, spread_key: str) -> tuple[list, list]:
        rows = [run["overall"], *(run.get("phases") or [])][: len(categories)]
        rows += [{}] * (len(categories) - len(rows))
        return ([r.get(key) for r in rows], [(r.get(spread_key) or {}).get("stdev") for r in rows])

    slo = {p: per_phase(r, "slo_attainment_pct", "spread") for p, r in runs.items()}
    tok = {p: per_phase(r, "output_tok_per_s", "output_tok_per_s_spread") for p, r in runs.items()}
    policies = list(runs)
    ensure_parent(path)
    bar_chart(path, [
        Bars("SLO attainment (mean over seeds, ± stdev)", "% of requests", categories,
             {p: v for p, (v, _) in slo.items()}, {p: e for p, (_, e) in slo.items()}, value_format="{:.0f}"),
        Bars("output tok/s (mean over seeds, ± stdev)", "tokens/s", categories,
             {p: v for p, (v, _) in tok.items()}, {p: e for p, (_, e) in tok.items()}, value_format="{:.1f}"),
        Bars("role flips (mean per seed)", "flips", policies,
             {"flips": [(runs[p].get("flips") or {}).get("mean") for p in policies]}, value_format="{:.1f}"),
        Bars("TTFT predictor error (mean over seeds)", "MdAPE %", policies,
             {"MdAPE": [(runs[p].get("ttft_predictor_mdape_pct") or {}).get("mean") for p in policies]},
             value_format="{:.1f}"),
    ], title=f"bench pd: {doc.get('layout', '?')}, workload {doc.get('workload', '?')}, "
             f"seeds {doc.get('seeds', '?')}")
    return True
