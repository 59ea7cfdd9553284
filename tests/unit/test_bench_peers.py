"""`xllm bench vs-llamacpp` and `xllm bench fidelity`: their scoring and argument parsing (the runs need llama.cpp)."""

from __future__ import annotations

import argparse

import pytest

from bench import vs_llamacpp


def test_ratios_divide_ours_by_theirs_for_rows_both_sides_have() -> None:
    doc = {
        "llama_cpp": {"tg128": 200.0, "pp512": 500.0, "served_output_tok_s": {"16": 100.0}},
        "xllm": {"decode_c1_tok_s": 150.0, "prefill_tok_s": 3000.0, "spec_decode_c1_tok_s": {"suffix": 450.0},
                 "served_output_tok_s": {"16": 400.0, "64": 500.0}},
    }
    r = vs_llamacpp.ratios(doc)
    assert r["single_stream_decode"] == pytest.approx(0.75)
    assert r["prefill"] == pytest.approx(6.0)
    assert r["single_stream_decode_suffix"] == pytest.approx(2.25)
    assert r["served_c16_output"] == pytest.approx(4.0)
    assert "served_c64_output" not in r  # llama.cpp has no row at 64 here


def test_arguments_parse_and_missing_llama_is_a_clear_error(tmp_path) -> None:
    p = argparse.ArgumentParser()
    vs_llamacpp.add_arguments(p)
    args = p.parse_args(["--llama-bin-dir", str(tmp_path), "--serve-concurrency", "", "--reps", "1"])
    assert args.serve_concurrency == []
    with pytest.raises(SystemExit, match="llama-bench"):
        vs_llamacpp.run(args)


def test_fidelity_scores_leading_agreement() -> None:
    from bench import fidelity

    assert fidelity.common_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert fidelity.common_prefix([1, 2], [1, 2]) == 2
    assert fidelity.common_prefix([], [1]) == 0
    scored = fidelity._score([[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 0, 6]], 3)
    assert scored["mean_tokens_agreeing"] == 2.0 and scored["fully_agreeing_prompts"] == 0.5
