"""Every bench's `--plot`: from a small fixed results document, a valid PNG that is not blank and
shows the first series' colour; the chart helpers' argument checks; the `--plot` flags exist."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from bench import offline as bench_offline
from bench.chart import LINE_COLOR, Bars, Curves, Series, bar_chart, curves_chart
from bench.plots import kv_plot, offline_plot, pd_plot, quality_plot, serve_plot


def read_png(path: Path) -> np.ndarray:
    """RGB(A) pixels 0-255 after checking the PNG signature, chunk CRCs and IHDR/IEND framing."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, tags = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + payload) & 0xFFFFFFFF, tag
        tags.append(tag)
        pos += 12 + length
    assert tags[0] == b"IHDR" and tags[-1] == b"IEND" and b"IDAT" in tags
    return np.rint(matplotlib.image.imread(path) * 255).astype(np.int64)


def assert_chart(path: Path, size: tuple[int, int]) -> None:
    pixels = read_png(path)
    assert pixels.shape[:2] == size
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 50, "blank chart"
    rgb = tuple(int(LINE_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    assert (pixels[..., :3] == rgb).all(axis=-1).sum() > 20, "the first series is not drawn"


def _latency(p50: float, p99: float) -> dict:
    return {"mean": (p50 + p99) / 2, "p50": p50, "p99": p99}


SERVE_DOC = {
    "benchmark": "serve", "model": "m", "endpoint": "completions", "prompt_len": 200, "output_len": 128,
    "results": [
        {"concurrency": c, "completed": 8, "output_throughput": t, "ttft_ms": _latency(*ttft),
         "tpot_ms": _latency(*tpot)}
        for c, t, ttft, tpot in ((1, 40.0, (80, 95), (25, 27)), (4, 120.0, (150, 300), (33, 40)),
                                 (16, 210.0, (600, 1400), (70, 110)))
    ],
}

OFFLINE_RESULT = {
    "concurrency": 4, "num_requests": 16, "prompt_len": 32, "output_len": 16, "output_tokens_per_s": 55.0,
    "timeline": bench_offline.timeline([(0.1 * i, 5 * i, 4 if i < 30 else 2) for i in range(1, 41)], 4.0, bins=20),
}

KV_DOC = {
    "workers": 1, "kv_cache_memory": "12MiB", "workload": {"requests": 24},
    "runs": {
        mode: {"ttft_ms": {"p50": p50, "p90": p50 * 2, "mean": p50 * 1.3},
               "hit_rate": {"hbm": hbm, "dram": dram, "ssd": ssd, "total": hbm + dram + ssd},
               "prompt_tok_per_s": 900.0 if dram else 600.0, "output_tok_per_s": 40.0}
        for mode, p50, hbm, dram, ssd in (("tiers-on", 120.0, 0.2, 0.3, 0.1), ("tiers-off", 260.0, 0.2, 0.0, 0.0))
    },
}

QUALITY_REPORT = {
    "tokens": 1024,
    "modes": {
        name: {"perplexity": ppl, "top1_agreement_with_fp32": top1, "kl_from_fp32": kl}
        for name, ppl, top1, kl in (("fp32", 12.1, 1.0, 0.0), ("bf16", 12.2, 0.985, 0.0021),
                                    ("bf16+int8-weights (<=4 rows)", 12.4, 0.962, 0.0093),
                                    ("bf16+w8a8 (>4 rows)", 12.9, 0.941, 0.0187))
    },
}


def _pd_run(slo: float, tok: float, flips: float) -> dict:
    spread = {"min": slo - 5, "max": slo + 5, "stdev": 4.0, "n": 3}
    phase = lambda name, k: {"phase": name, "slo_attainment_pct": slo * k, "spread": spread,  # noqa: E731
                             "output_tok_per_s": tok * k, "output_tok_per_s_spread": {"stdev": 2.0}}
    return {"overall": {"slo_attainment_pct": slo, "spread": spread, "output_tok_per_s": tok,
                        "output_tok_per_s_spread": {"stdev": 3.0}, "completed": 30},
            "phases": [phase("prompt-heavy", 0.9), phase("decode-heavy", 1.05)],
            "flips": {"mean": flips}, "ttft_predictor_mdape_pct": {"mean": 18.0 if flips else None}}


PD_DOC = {"layout": "1P+2D", "workload": "shifting", "seeds": [0, 1, 2],
          "runs": {"mixed": _pd_run(62.0, 80.0, 0), "static": _pd_run(55.0, 75.0, 0),
                   "dynamic": _pd_run(74.0, 85.0, 2.3)}}


@pytest.mark.parametrize(("plot", "doc", "size"), [
    (serve_plot, SERVE_DOC, (420, 1120)),
    (offline_plot, OFFLINE_RESULT, (420, 1120)),
    (kv_plot, KV_DOC, (840, 1120)),
    (quality_plot, QUALITY_REPORT, (840, 1120)),
    (pd_plot, PD_DOC, (840, 1120)),
], ids=["serve", "offline", "kv", "quality", "pd"])
def test_each_bench_plot_writes_a_valid_png(tmp_path: Path, plot: Callable[[str, dict], bool], doc: dict,
                                            size: tuple[int, int]) -> None:
    path = tmp_path / "nested" / "dir" / "plot.png"  # the folder is created
    assert plot(str(path), doc) is True
    assert_chart(path, size)


def test_plots_without_results_write_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none.png"
    assert serve_plot(str(path), {**SERVE_DOC, "results": [{**SERVE_DOC["results"][0], "completed": 0}]}) is False
    assert kv_plot(str(path), {"runs": {}}) is False
    assert quality_plot(str(path), {"modes": {}}) is False
    assert pd_plot(str(path), {"runs": {}}) is False
    assert not path.exists()


def test_chart_helpers_check_their_input(tmp_path: Path) -> None:
    path = str(tmp_path / "bad.png")
    with pytest.raises(ValueError):
        curves_chart(path, [])
    with pytest.raises(ValueError):
        curves_chart(path, [Curves("t", "x", "y", [Series("s", [1.0, 2.0], [1.0])])])
    with pytest.raises(ValueError):
        bar_chart(path, [Bars("t", "y", ["a", "b"], {"g": [1.0]})])
    assert not Path(path).exists()


def test_gaps_and_missing_values_still_draw(tmp_path: Path) -> None:
    path = tmp_path / "gaps.png"
    curves_chart(str(path), [
        Curves("with a gap", "x", "y", [Series("s", [0, 1, 2, 3], [1.0, None, 3.0, float("nan")])]),
        Curves("nothing finite", "x", "y", [Series("s", [0, 1], [None, None])]),
    ])
    read_png(path)
    bar_chart(str(tmp_path / "bars.png"), [Bars("t", "y", ["a", "b"], {"g": [None, 2.0]}, {"g": [None, 0.5]})])
    read_png(tmp_path / "bars.png")


def test_offline_timeline_bins_the_run() -> None:
    steps = [(0.5 * i, 10 * i, 3) for i in range(1, 21)]  # 10 s, 20 tok/s
    points = bench_offline.timeline(steps, 10.0, bins=5)
    assert len(points) == 5
    assert [round(p["t_s"], 3) for p in points] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert all(abs(p["output_tok_per_s"] - 20.0) < 1e-6 and p["in_flight"] == 3 for p in points)
    assert bench_offline.timeline([], 1.0) == []


@pytest.mark.parametrize("command", ["offline", "serve", "kv", "quality", "pd"])
def test_every_bench_takes_plot_and_no_progress(command: str) -> None:
    from xllm.cli import build_parser

    extra = ["--url", "http://h:1"] if command == "serve" else []
    args = build_parser().parse_args(["bench", command, *extra, "--plot", "out.png", "--no-progress"])
    assert args.png_path == "out.png" and args.no_progress is True
    assert build_parser().parse_args(["bench", command, *extra, "--quiet"]).no_progress is True
