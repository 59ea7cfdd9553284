"""`xllm bench eplb` end to end on a very small run: the JSON it writes and what it claims."""

from __future__ import annotations

import json

from xllm.cli import build_parser


def test_bench_eplb_balances_the_skewed_model_and_keeps_its_tokens(tmp_path, capsys):
    out = tmp_path / "eplb.json"
    args = build_parser().parse_args([
        "bench", "eplb", "--experts", "8", "--layers", "2", "--ep-ranks", "2", "--redundant", "2",
        "--requests", "3", "--prompt-len", "12", "--max-tokens", "3", "--json", str(out)])
    assert args.func(args) == 0
    doc = json.loads(out.read_text())
    before, after = doc["before"], doc["after"]
    assert doc["greedy_tokens_unchanged"] is True
    # the same tokens were served in both runs, only spread differently over the ranks
    assert sum(before["rank_tokens"]) == sum(after["rank_tokens"]) > 0
    assert before["balanced_cost_tokens"] == after["balanced_cost_tokens"]
    assert after["peak_over_mean"] <= before["peak_over_mean"]
    assert doc["replacement_cost"]["compute_s"] > 0 and doc["replacement_cost"]["apply_s"] > 0
    assert all(sorted(set(layout)) == list(range(8)) and len(layout) == 10 for layout in doc["placement"])
    assert "simulated" in doc["note"]
    assert "peak/mean rank load" in capsys.readouterr().out
