"""Our models equal transformers on the same weights, through the paged KV cache.

Every variant is a tiny random checkpoint saved by transformers (safetensors), loaded with
``load_model`` and compared against transformers' own full forward: prefill, greedy decode one
token at a time, and mixed batches (one sequence decoding while another prefills in chunks).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
from transformers.activations import ACT2FN
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from _model_helpers import PagedDriver, hf_logits, make_hf_model, save_hf_model
from common.models.config import ModelConfig
from common.models.rope import RotaryEmbedding, rope_inverse_frequencies
from common.models.registry import default_model_path, load_model
from kernels.activation import gelu_tanh_and_mul, silu_and_mul
from kernels.norm import rms_norm
from kernels.rotary import apply_rotary

ATOL = 1e-3

VARIANTS = {
    "llama": ("llama", dict(tie_word_embeddings=True)),
    "llama3_rope": (
        "llama",
        dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}),
    ),
    "llama_bias_head_dim": ("llama", dict(attention_bias=True, mlp_bias=True, head_dim=32)),
    "mistral_sliding": ("mistral", dict(sliding_window=4)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_yarn_sliding": (
        "qwen2",
        dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 4.0,
                              "original_max_position_embeddings": 16},
             use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    "qwen3_linear_rope": (
        "qwen3",
        dict(head_dim=32, rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 2.0}),
    ),
    "gemma3": (
        "gemma3",
        dict(num_hidden_layers=4, head_dim=32, sliding_window=4, sliding_window_pattern=2,
             query_pre_attn_scalar=24, final_logit_softcapping=5.0,
             hidden_activation="gelu_pytorch_tanh"),
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(name, transformers model, our model) for one variant."""
    family, overrides = VARIANTS[request.param]
    hf = make_hf_model(family, seed=len(request.param), **overrides)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    ours, config = load_model(path)
    assert config.num_hidden_layers == hf.config.num_hidden_layers
    return request.param, hf, ours


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def test_prefill_then_greedy_decode_matches_hf(pair):
    name, hf, ours = pair
    driver = PagedDriver(ours, page_size=4)
    tokens = _tokens(11, seed=1)
    step_logits = [driver.step([(0, tokens)])[0]]
    for _ in range(8):
        tokens.append(int(step_logits[-1][-1].argmax()))
        step_logits.append(driver.step([(0, [tokens[-1]])])[0])
    ours_all = torch.cat(step_logits)[: len(tokens) - 1]
    ref = hf_logits(hf, tokens)[: len(tokens) - 1]

    assert ref.abs().max() > 1.0, "weights too small for a meaningful comparison"
    diff = (ours_all - ref).abs().max(dim=-1).values
    assert diff[:11].max() < ATOL, f"{name}: prefill differs by {diff[:11].max():.2e}"
    for i, d in enumerate(diff[11:]):
        assert d < ATOL, f"{name}: decode step {i} differs by {d:.2e}"
    # our greedy choices are transformers' greedy choices
    assert ref[10:].argmax(-1).tolist() == tokens[11:]


def test_mixed_batch_with_chunked_prefill_matches_hf(pair):
    """One sequence decodes while another prefills in two chunks, in the same flat batch."""
    name, hf, ours = pair
    driver = PagedDriver(ours, page_size=4)
    a, b = _tokens(7, seed=2), _tokens(9, seed=3)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    got[0].append(driver.step([(0, a)])[0])
    a.append(int(got[0][-1][-1].argmax()))
    la, lb = driver.step([(0, [a[-1]]), (1, b[:5])])  # decode A + first chunk of B
    got[0].append(la)
    got[1].append(lb)
    a.append(int(la[-1].argmax()))
    lb, la = driver.step([(1, b[5:]), (0, [a[-1]])])  # rest of B (cached prefix) + decode A
    got[0].append(la)
    got[1].append(lb)
    a.append(int(la[-1].argmax()))
    b.append(int(lb[-1].argmax()))
    la, lb = driver.step([(0, [a[-1]]), (1, [b[-1]])])  # both decode
    got[0].append(la)
    got[1].append(lb)

    for seq, tokens in ((0, a), (1, b)):
        ours_rows = torch.cat(got[seq])
        ref = hf_logits(hf, tokens)
        assert ours_rows.shape == ref.shape
        diff = (ours_rows - ref).abs().max()
        assert diff < ATOL, f"{name}: sequence {seq} differs by {diff:.2e}"


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_bfloat16_is_close_to_fp32_reference(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    hf = make_hf_model(family, seed=7, **overrides)
    ours, _ = load_model(save_hf_model(hf, tmp_path), dtype=torch.bfloat16)
    assert next(ours.parameters()).dtype == torch.bfloat16
    tokens = _tokens(12, seed=4)
    driver = PagedDriver(ours, page_size=4)
    prefill = driver.step([(0, tokens[:10])])[0]
    decode = [driver.step([(0, [t])])[0] for t in tokens[10:]]
    got = torch.cat([prefill, *decode])
    assert got.dtype == torch.float32
    ref = hf_logits(hf, tokens)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 0.05, f"bf16 relative error {rel:.3f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_reserved_rotary_tables_give_the_same_result(tmp_path):
    hf = make_hf_model("gemma3", seed=5, **{**VARIANTS["gemma3"][1], "max_position_embeddings": 64})
    ours, _ = load_model(save_hf_model(hf, tmp_path))
    ours.reserve_positions(64)
    assert ours.rotary._table.shape[0] == 64 and ours.local_rotary._table.shape[0] == 64
    tokens = _tokens(9, seed=6)
    got = PagedDriver(ours).step([(0, tokens)])[0]
    assert (got - hf_logits(hf, tokens)).abs().max() < ATOL


def test_compute_logits_only_on_selected_rows(tmp_path):
    hf = make_hf_model("llama", seed=3)
    ours, config = load_model(save_hf_model(hf, tmp_path))
    driver = PagedDriver(ours)
    tokens = _tokens(6, seed=5)
    from kernels.attention import build_attention_metadata

    meta = build_attention_metadata([6], [6], [[9, 3]], 4)
    with torch.no_grad():
        hidden = ours(torch.tensor(tokens), torch.arange(6), meta, driver.kv_caches)
        last = ours.compute_logits(hidden[-1:])
    assert hidden.shape == (6, config.hidden_size)
    assert last.shape == (1, config.vocab_size) and last.dtype == torch.float32
    assert (last[0] - hf_logits(hf, tokens)[-1]).abs().max() < ATOL


# ---- rotary scaling, config normalisation, kernels: each against transformers' own code ----

@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 500_000.0},
        {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        {"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
        {"rope_type": "yarn", "rope_theta": 10_000.0, "factor": 16.0, "original_max_position_embeddings": 4096,
         "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_match_transformers(rope):
    hf_config = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, max_position_embeddings=131072,
                                         rope_parameters=dict(rope))
    hf_rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    config = ModelConfig.from_hf_dict(hf_config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    inv_freq, scaling = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(inv_freq, hf_rope.inv_freq, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(hf_rope.attention_scaling)

    positions = torch.tensor([0, 1, 7, 4095, 40000])
    cos, sin = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling).lookup(
        positions, torch.float32)
    hf_cos, hf_sin = hf_rope(torch.zeros(1), positions[None])
    torch.testing.assert_close(cos, hf_cos[0, :, : config.head_dim // 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0, :, : config.head_dim // 2], rtol=0, atol=1e-6)


def test_legacy_config_spellings_match_transformers():
    llama_old = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100,
                 "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "rope_theta": 500_000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}
    cfg = ModelConfig.from_hf_dict(llama_old)
    assert cfg.rope_theta == 500_000.0 and cfg.num_key_value_heads == 4 and cfg.head_dim == 16
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    hf = transformers.LlamaConfig(**{k: v for k, v in llama_old.items() if k != "model_type"})
    assert hf.rope_parameters["rope_type"] == "linear" and hf.rope_parameters["rope_theta"] == 500_000.0

    qwen_old = {"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 2}
    cfg = ModelConfig.from_hf_dict(qwen_old)
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.sliding_window is None
    assert cfg.layer_sliding == [False] * 4 and cfg.attention_bias and not cfg.o_proj_bias

    gemma_old = {"model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 12, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
                 "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                 "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                 "sliding_window": 512, "sliding_window_pattern": 6}
    cfg = ModelConfig.from_hf_dict(gemma_old)
    hf = transformers.Gemma3TextConfig(**{k: v for k, v in gemma_old.items() if k != "model_type"})
    assert cfg.layer_sliding == [t == "sliding_attention" for t in hf.layer_types]
    assert cfg.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert cfg.rope_local_base_freq == hf.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert cfg.rope_local_scaling is None
    assert cfg.tie_word_embeddings and cfg.hidden_act == "gelu_pytorch_tanh"
    assert cfg.query_pre_attn_scalar == 256


def test_generation_config_eos_ids_are_merged(tmp_path):
    hf = make_hf_model("llama", seed=1, eos_token_id=2)
    path = save_hf_model(hf, tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    _, config = load_model(path)
    assert config.eos_token_ids == [2, 7]


def test_load_model_rejects_unknown_inputs(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 10, "hidden_size": 8,
         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}))
    hf = make_hf_model("llama", seed=1)
    hf.save_pretrained(str(tmp_path / "w"))
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "w" / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="unsupported model"):
        load_model(str(tmp_path))


def test_default_model_path_points_at_the_bundled_gguf():
    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    torch.manual_seed(0)
    x = (torch.randn(5, 3, 48) * 3).to(dtype)
    llama_norm = LlamaRMSNorm(48, eps=1e-5)
    gemma_norm = Gemma3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        llama_norm.weight.copy_(torch.randn(48))
        gemma_norm.weight.copy_(torch.randn(48) * 0.3)
    llama_norm.to(dtype)
    gemma_norm.to(dtype)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(rms_norm(x, llama_norm.weight, 1e-5), llama_norm(x), **tol)
    torch.testing.assert_close(rms_norm(x, gemma_norm.weight, 1e-6, unit_offset=True), gemma_norm(x), **tol)


def test_rotary_matches_transformers_with_half_and_full_tables():
    torch.manual_seed(0)
    T, H, D = 6, 3, 16
    q = torch.randn(T, H, D)
    rope = RotaryEmbedding(D, 10_000.0)
    positions = torch.tensor([5, 0, 9, 2, 2, 31])
    cos, sin = rope.lookup(positions, torch.float32)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    # HF layout: [B, H, T, D] with cos/sin [B, T, D]
    ref, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], full_cos[None], full_sin[None])
    expected = ref[0].transpose(0, 1)
    torch.testing.assert_close(apply_rotary(q, cos, sin), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(q, full_cos, full_sin), expected, rtol=0, atol=1e-6)
    # position 0 is the identity, and rotation preserves each pair's norm
    torch.testing.assert_close(apply_rotary(q, cos, sin)[1], q[1])
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_gated_activations_match_transformers():
    torch.manual_seed(0)
    gate, up = torch.randn(4, 24) * 3, torch.randn(4, 24)
    fused = torch.cat((gate, up), -1)
    torch.testing.assert_close(silu_and_mul(fused), ACT2FN["silu"](gate) * up)
    torch.testing.assert_close(gelu_tanh_and_mul(fused), ACT2FN["gelu_pytorch_tanh"](gate) * up)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["cpp", "pytorch"])
def test_int8_kv_cache_stays_close_to_hf(pair, cpu_kernels, monkeypatch):
    """Every variant over an int8 KV cache (quantised on write, dequantised on read): prefill,
    then one token at a time, close to transformers' fp32 logits (not equal: int8 rounds)."""
    import common.models.layers as layers
    import kernels.attention as attention

    name, hf, ours = pair
    if not cpu_kernels:
        monkeypatch.setattr(attention, "paged_decode_module", lambda: None)
        monkeypatch.setattr(layers, "_cpu_ext", lambda x: None)
    driver = PagedDriver(ours, page_size=4, dtype=torch.int8)
    tokens = _tokens(20, seed=8)
    got = torch.cat([driver.step([(0, tokens[:12])])[0], *(driver.step([(0, [t])])[0] for t in tokens[12:])])
    ref = hf_logits(hf, tokens)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel < 0.05, f"{name}: int8 KV relative error {rel:.3f}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
