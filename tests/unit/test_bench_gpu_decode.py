"""`xllm bench gpu-decode`: a clear refusal without a GPU, the weight-byte count, and on a GPU the
JSON it writes."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench import gpu_decode
from kernels.backend import triton_available


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    gpu_decode.add_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_it_says_so_and_exits_1(capsys):
    assert gpu_decode.run(_args()) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_count_what_a_decode_step_reads(tmp_path, tied):
    from _model_helpers import make_hf_model, save_hf_model
    from common.models.registry import load_model

    hf = make_hf_model("llama", seed=1, tie_word_embeddings=tied)
    model, config = load_model(save_hf_model(hf, tmp_path))
    params = sum(p.numel() for p in hf.parameters()) * 4  # fp32, each shared tensor once
    embed = config.vocab_size * config.hidden_size * 4
    # Tied: the embedding is the lm head, read whole. Untied: only a few of its rows are read.
    assert gpu_decode.weight_bytes(model) == (params if tied else params - embed)


@pytest.mark.skipif(not torch.cuda.is_available() or not triton_available(), reason="needs a CUDA GPU and triton")
def test_gpu_rows_and_floor(tmp_path):
    out = tmp_path / "gpu.json"
    assert gpu_decode.run(_args("--batches", "1,4", "--context", "16", "--steps", "8", "--kv-cache-memory",
                                "256MiB", "--json", str(out))) == 0
    doc = json.loads(out.read_text())
    assert doc["bandwidth_gbps"] > 0 and doc["weight_bytes"] > 0
    assert {(r["batch"], r["graphs"]) for r in doc["results"]} == {(1, True), (4, True), (1, False), (4, False)}
    for r in doc["results"]:
        assert r["steps_timed"] >= 1 and r["step_ms"] > 0 and r["floor_ratio"] > 0
