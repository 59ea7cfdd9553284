"""`xllm bench quality` on the real default model: the W8A8 path against fp32."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench import quality
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import packed_linear_supported


@pytest.mark.skipif(cpu_ops_module() is None or not packed_linear_supported(torch.bfloat16),
                    reason="the W8A8 path needs the C++ CPU kernels and oneDNN bf16 GEMMs (AVX512-BF16 or AMX)")
def test_w8a8_stays_close_to_fp32_on_real_text(tmp_path, monkeypatch, smollm_path):
    text = tmp_path / "text.txt"
    text.write_text("The printing press changed how ideas spread. Books became cheaper, more people learned to "
                    "read, and scientists could share their results with colleagues across Europe. " * 3)
    modes = {k: v for k, v in quality.MODES.items() if k in ("fp32", "bf16+w8a8 (>4 rows)")}
    monkeypatch.setattr(quality, "MODES", modes)
    out = tmp_path / "q.json"
    args = argparse.Namespace(model=smollm_path, text=str(text), max_tokens=96, json_path=str(out))
    report = quality.measure(args)
    assert json.loads(out.read_text()) == report
    ref, w8a8 = report["modes"]["fp32"], report["modes"]["bf16+w8a8 (>4 rows)"]
    assert ref["top1_agreement_with_fp32"] == 1.0 and ref["kl_from_fp32"] < 1e-6
    # Loose bounds: a broken quantizer (wrong scales, no smoothing, bad rounding) lands far outside.
    assert w8a8["top1_agreement_with_fp32"] > 0.75
    assert w8a8["kl_from_fp32"] < 0.2
    assert w8a8["perplexity"] < 1.3 * ref["perplexity"]


@pytest.mark.skipif(cpu_ops_module() is None or not packed_linear_supported(torch.bfloat16),
                    reason="the bf16 modes need the C++ CPU kernels and oneDNN bf16 GEMMs (AVX512-BF16 or AMX)")
def test_int8_kv_mode_stays_close_to_fp32_on_real_text(tmp_path, monkeypatch, smollm_path):
    text = tmp_path / "text.txt"
    text.write_text("Rivers carve valleys over thousands of years; the water carries sand and stones downstream, "
                    "and the valley widens where the river bends. " * 3)
    modes = {k: v for k, v in quality.MODES.items() if k in ("fp32", "bf16", "bf16+int8-kv")}
    assert len(modes) == 3
    monkeypatch.setattr(quality, "MODES", modes)
    args = argparse.Namespace(model=smollm_path, text=str(text), max_tokens=96, json_path=None)
    report = quality.measure(args)
    ref, bf16, kv8 = (report["modes"][k] for k in ("fp32", "bf16", "bf16+int8-kv"))
    # int8 KV on top of bf16: a broken scale or a lost scale on a page lands far outside these.
    assert kv8["top1_agreement_with_fp32"] > 0.75 and kv8["kl_from_fp32"] < 0.2
    assert kv8["perplexity"] < 1.3 * ref["perplexity"]
    assert kv8["kl_from_fp32"] < bf16["kl_from_fp32"] + 0.1


@pytest.mark.skipif(cpu_ops_module() is None or not packed_linear_supported(torch.bfloat16),
                    reason="the W8A8 path needs the C++ CPU kernels and oneDNN bf16 GEMMs (AVX512-BF16 or AMX)")
def test_prompt_path_mode_sits_between_bf16_and_full_w8a8(tmp_path, monkeypatch, smollm_path):
    """The engine's prompt path (bf16, its marked layers W8A8) is scored as such: not the bf16
    numbers (the marked layers do run int8), closer to fp32 than W8A8 everywhere."""
    text = tmp_path / "text.txt"
    text.write_text("The lighthouse keeper climbed the stairs each evening, trimmed the wick, and watched the ships "
                    "pass the rocks at the mouth of the harbour until dawn. " * 3)
    names = ("fp32", "bf16", "prompts (bf16, W8A8 gate_up)", "bf16+w8a8 (>4 rows)")
    monkeypatch.setattr(quality, "MODES", {k: quality.MODES[k] for k in names})
    args = argparse.Namespace(model=smollm_path, text=str(text), max_tokens=96, json_path=None)
    kl = {k: v["kl_from_fp32"] for k, v in quality.measure(args)["modes"].items()}
    assert kl[names[2]] != kl["bf16"]
    assert kl[names[2]] < kl["bf16+w8a8 (>4 rows)"]
