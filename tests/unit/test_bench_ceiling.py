"""`xllm bench ceiling`: the ceiling arithmetic against numbers worked out by hand, each measurement on
tiny sizes, and the command end to end on a tiny config (no weights, no engine run)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import ceiling
from bench.ceiling import Arch
from common.engine.config import EngineConfig
from kernels.cpu_ext import cpu_ops_module
from xllm.cli import build_parser

# qkv 8 x (2 + 2*1)*4 = 8x16, o 8x8, gate_up 8x32, down 16x8: 128 + 64 + 256 + 128 = 576 weights a
# layer, so 2 * 2 layers * 576 = 2304 ops a token; LM head 2 * 8 * 32 = 512 ops.
TINY = Arch(hidden=8, layers=2, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=32)


def test_shapes_and_ops_per_token():
    assert TINY.linear_shapes() == {"qkv": (8, 16), "o": (8, 8), "gate_up": (8, 32), "down": (16, 8),
                                    "lm_head": (8, 32)}
    assert TINY.layer_ops_per_token() == 2304
    assert TINY.lm_head_ops() == 512


def test_kv_row_bytes():
    assert ceiling.kv_row_bytes(64, torch.int8) == 68  # 64 values and a 4-byte fp32 scale
    assert ceiling.kv_row_bytes(64, torch.bfloat16) == 128
    assert ceiling.kv_row_bytes(4, torch.int8) == 8


def test_workload_and_ceilings_by_hand():
    # 3 streams, prompt 5, output 4: 3 decode steps attending over 6, 7 and 8 rows.
    work = ceiling.workload(TINY, concurrency=3, prompt_len=5, output_len=4, row_bytes=8)
    assert work.output_tokens == 12
    assert work.prompt_gemm_ops == 3 * (5 * 2304 + 512) == 36096
    assert work.decode_gemm_ops == 3 * 3 * (2304 + 512) == 25344
    # 3 streams x 21 rows x 2 layers x 1 KV head x (K and V) x 8 bytes
    assert work.kv_bytes == 3 * (6 + 7 + 8) * 2 * 1 * 2 * 8 == 2016

    lines = ceiling.ceilings(work, int8_ops_s=1000.0, bf16_ops_s=500.0, read_bytes_s=100.0)
    int8, built = lines["int8"], lines["as_built"]
    assert int8["kv_s"] == built["kv_s"] == pytest.approx(20.16)
    assert int8["gemm_s"] == pytest.approx(61.44)  # (36096 + 25344) / 1000
    assert int8["tok_s"] == pytest.approx(12 / 81.6)
    assert built["gemm_s"] == pytest.approx(72.192 + 25.344)  # prompt at 500, decode at 1000
    assert built["tok_s"] == pytest.approx(12 / 117.696)


def test_prompt_gemms_the_engine_runs_in_int8_count_at_the_int8_peak():
    # gate_up: K 8, N 32 -> 2 x 256 x 2 layers = 1024 ops per prompt token, 3 x 5 tokens
    work = ceiling.workload(TINY, concurrency=3, prompt_len=5, output_len=4, row_bytes=8, prompt_int8={"gate_up"})
    assert work.prompt_int8_ops == 15 * 1024
    built = ceiling.ceilings(work, int8_ops_s=1000.0, bf16_ops_s=500.0, read_bytes_s=100.0)["as_built"]
    assert built["gemm_s"] == pytest.approx((36096 - 15360) / 500 + (15360 + 25344) / 1000)
    assert ceiling.prompt_int8_shapes(EngineConfig()) == {"gate_up"}
    assert ceiling.prompt_int8_shapes(EngineConfig(w8a8_prompts=True)) == {"qkv", "o", "gate_up", "down"}
    assert ceiling.prompt_int8_shapes(EngineConfig(prompt_w8a8_layers="")) == frozenset()


def test_one_output_token_has_no_decode_step():
    work = ceiling.workload(TINY, concurrency=2, prompt_len=5, output_len=1, row_bytes=8)
    assert work.decode_gemm_ops == 0 and work.kv_bytes == 0
    assert work.prompt_gemm_ops == 2 * (5 * 2304 + 512)


def test_measurements_on_tiny_sizes_are_positive():
    shapes = {"a": (24, 40), "b": (33, 17)}  # odd K and N: the CPU's _int_mm takes them
    for measure in (ceiling.int8_gemm_peak, ceiling.bf16_gemm_peak):
        out = measure(shapes, [1, 17], 1)
        assert [(r["shape"], r["m"]) for r in out["results"]] == [("a", 1), ("a", 17), ("b", 1), ("b", 17)]
        assert all(r["gops"] > 0 for r in out["results"])
        assert out["peak_gops"] == max(r["gops"] for r in out["results"])
    # int8: the faster of oneDNN's GEMM and the packed kernel (which takes K a multiple of 4 only)
    for r in ceiling.int8_gemm_peak(shapes, [1, 17], 1)["results"]:
        assert r["gops"] == max(r["int_mm_gops"], r.get("packed_gops", 0.0))
        assert r["kernel"] == ("int8_gemm" if r.get("packed_gops", 0.0) > r["int_mm_gops"] else "_int_mm")
        assert ("packed_gops" in r) == (r["shape"] == "a" and cpu_ops_module() is not None
                                        and cpu_ops_module().int8_gemm_supported())
    bw = ceiling.read_bandwidth(2, 1)
    assert min(bw["int64_sum_gbps"], bw["float32_sum_gbps"], bw["copy_gbps"]) > 0
    assert bw["read_gbps"] == max(bw["int64_sum_gbps"], bw["float32_sum_gbps"])


def _tiny_model_dir(tmp_path, **extra):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              **extra}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_command_writes_the_json(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    args = build_parser().parse_args([
        "bench", "ceiling", "--model", _tiny_model_dir(tmp_path), "--kv-cache-dtype", "int8",
        "--concurrency", "4", "--prompt-len", "10", "--output-len", "3", "--gemm-rows", "17",
        "--bandwidth-mib", "2", "--repeats", "1", "--json", str(out)])
    assert args.func(args) == 0
    doc = json.loads(out.read_text())
    assert {"model", "arch", "workload", "int8_gemm", "bf16_gemm", "bandwidth", "ceilings", "torch_threads",
            "cpu_count", "machine", "cpu_flags", "loadavg_1min"} <= set(doc)
    assert "offline" not in doc
    assert doc["arch"] == {"hidden": 64, "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 16,
                           "intermediate": 128, "vocab": 256}
    assert doc["workload"]["kv_cache_dtype"] == "int8" and doc["workload"]["kv_row_bytes"] == 20
    assert len(doc["int8_gemm"]["results"]) == len(doc["bf16_gemm"]["results"]) == 5  # shapes x 1 M
    for key in ("int8", "as_built"):
        assert doc["ceilings"][key]["tok_s"] > 0
    printed = capsys.readouterr().out
    assert "ceiling, every GEMM int8" in printed and "ceiling as built" in printed


def test_bad_arguments_are_refused(tmp_path):
    for bad in ("64,x", "0", ""):
        with pytest.raises(SystemExit, match="gemm-rows"):
            ceiling._parse_rows(bad)
    assert ceiling._parse_rows("17,64") == [17, 64]
    moe = _tiny_model_dir(tmp_path, model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=4,
                          num_experts_per_tok=2)
    with pytest.raises(SystemExit, match="mixture of experts"):
        ceiling.read_arch(moe)
