"""GGUF loading: dequantization per type, llama.cpp's Q/K permutation, metadata -> config,
and whole models equal to transformers (the real SmolLM2 file and tiny files written here)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers

from _model_helpers import PagedDriver, hf_logits, make_hf_model
from common.models.registry import default_model_path, load_model
from common.weights.gguf_loader import dequantize_tensor, load_gguf, permute_qk, unpermute_qk

ATOL = 1e-3

# SmolLM2's chat template applied to "What is the capital of France?" (transformers tokenizer)
CHAT_PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
               19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Verbatim semantics of llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _write_gguf(path, arch: str, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], kv=None):
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        getattr(writer, key)(value)
    for name, (array, qtype) in tensors.items():
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, gguf.quants.quantize(array, qtype))
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _read_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: dequantize_tensor(t) for t in gguf.GGUFReader(str(path)).tensors}


# ---------------------------------------------------------------- dequantization per type

Q = gguf.GGMLQuantizationType


def _blockwise(x: np.ndarray, size: int) -> np.ndarray:
    return x.reshape(x.shape[0], -1, size)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_dequantized_values_match_originals_within_quantization_error(qtype, tmp_path):
    rng = np.random.default_rng(0)
    original = (rng.standard_normal((6, 96)) * rng.uniform(0.1, 4, size=(6, 1))).astype(np.float32)
    _write_gguf(tmp_path / "t.gguf", "llama", {"w": (original, qtype)})
    tensor = gguf.GGUFReader(str(tmp_path / "t.gguf")).tensors[0]
    assert tensor.tensor_type == qtype
    got = dequantize_tensor(tensor)
    assert got.shape == original.shape and got.dtype == np.float32
    err = np.abs(got - original)

    if qtype == Q.F32:
        assert np.array_equal(got, original)
        return
    if qtype in (Q.F16, Q.BF16):
        mantissa_bits = 10 if qtype == Q.F16 else 7
        assert np.all(err <= np.abs(original) * 2.0 ** -mantissa_bits)
        return
    blocks, errs = _blockwise(original, 32), _blockwise(err, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    if qtype == Q.Q8_0:
        step = amax / 127  # one code step; rounding error is half of it (+ fp16 scale rounding)
        bound = 0.5 * step + 127 * step * 2.0 ** -11
    elif qtype == Q.Q4_0:
        step = amax / 8  # the largest magnitude maps to -8, so the other sign may clip by a step
        bound = step * (1 + 2.0 ** -9)
    else:  # Q4_1: min + 15 steps cover [min, max]
        step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
        bound = 0.5 * step + amax * 2.0 ** -9
    assert np.all(errs <= bound)
    assert err.max() > 0, "a quantized type must not be lossless on random data"


def _ref_q4_k(block: bytes) -> np.ndarray:
    """ggml-quants.c dequantize_row_q4_K for one 256-value block, written out loop by loop."""
    d = np.frombuffer(block[0:2], np.float16)[0].astype(np.float32)
    dmin = np.frombuffer(block[2:4], np.float16)[0].astype(np.float32)
    scales, qs = block[4:16], block[16:144]

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    out = []
    for chunk in range(4):
        q = qs[32 * chunk: 32 * chunk + 32]
        sc1, m1 = scale_min(2 * chunk)
        sc2, m2 = scale_min(2 * chunk + 1)
        d1, d2 = np.float32(d * np.float32(sc1)), np.float32(d * np.float32(sc2))
        mm1, mm2 = np.float32(dmin * np.float32(m1)), np.float32(dmin * np.float32(m2))
        out += [d1 * np.float32(b & 0xF) - mm1 for b in q]
        out += [d2 * np.float32(b >> 4) - mm2 for b in q]
    return np.array(out, np.float32)


def _ref_q6_k(block: bytes) -> np.ndarray:
    """ggml-quants.c dequantize_row_q6_K for one 256-value block."""
    ql, qh = block[0:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8)
    d = np.frombuffer(block[208:210], np.float16)[0].astype(np.float32)
    y = np.zeros(256, np.float32)
    for n in range(2):
        lo, hi, s = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            i = l // 16
            q1 = ((lo[l] & 0xF) | (((hi[l] >> 0) & 3) << 4)) - 32
            q2 = ((lo[l + 32] & 0xF) | (((hi[l] >> 2) & 3) << 4)) - 32
            q3 = ((lo[l] >> 4) | (((hi[l] >> 4) & 3) << 4)) - 32
            q4 = ((lo[l + 32] >> 4) | (((hi[l] >> 6) & 3) << 4)) - 32
            for offset, q, k in ((0, q1, 0), (32, q2, 2), (64, q3, 4), (96, q4, 6)):
                y[128 * n + l + offset] = np.float32(d * np.float32(s[i + k])) * np.float32(q)
    return y


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quants_dequantize_like_ggml(qtype, tmp_path):
    """gguf-py cannot quantize K-quants, so random blocks are built by hand (with sane fp16 scales)."""
    rng = np.random.default_rng(1)
    rows, blocks_per_row = 2, 2
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * blocks_per_row, type_size), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(rows * blocks_per_row, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:
        raw[:, 0:4] = scales  # d, dmin
    else:
        raw[:, 208:210] = scales[:, :2]  # d
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    writer.add_tensor("w", raw.reshape(rows, blocks_per_row * type_size), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    got = dequantize_tensor(gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors[0])
    assert got.shape == (rows, blocks_per_row * block_size)
    ref_fn = _ref_q4_k if qtype == Q.Q4_K else _ref_q6_k
    expected = np.stack([ref_fn(raw[i].tobytes()) for i in range(len(raw))]).reshape(got.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- Q/K permutation

@pytest.mark.parametrize("n_head,n_kv", [(9, 9), (9, 3), (4, 1)])
def test_unpermute_is_exact_inverse_of_llama_cpp_permute(n_head, n_kv):
    rng = np.random.default_rng(2)
    head_dim = 64
    for heads in (n_head, n_kv):
        weight = rng.standard_normal((heads * head_dim, 48)).astype(np.float32)
        bias = rng.standard_normal(heads * head_dim).astype(np.float32)
        for w in (weight, bias):
            permuted = llama_cpp_permute(w, n_head, heads)
            assert not np.array_equal(permuted, w)
            assert np.array_equal(permute_qk(w, heads), permuted)
            assert np.array_equal(unpermute_qk(permuted, heads), w)
            assert torch.equal(unpermute_qk(torch.from_numpy(permuted), heads), torch.from_numpy(w))


def test_permutation_turns_rotate_half_rope_into_interleaved_rope():
    """Why llama.cpp permutes: its rope rotates adjacent pairs, HF's rotates the two halves."""
    rng = np.random.default_rng(3)
    heads, d = 3, 8
    q = rng.standard_normal(heads * d)
    angles = rng.uniform(0, 6, d // 2)
    cos, sin = np.cos(angles), np.sin(angles)

    def rotate_half(v):  # HF: pairs (i, i + d/2)
        v = v.reshape(heads, d)
        a, b = v[:, : d // 2], v[:, d // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)

    def rotate_adjacent(v):  # llama.cpp "normal" rope: pairs (2i, 2i + 1)
        v = v.reshape(heads, d // 2, 2)
        a, b = v[..., 0], v[..., 1]
        return np.stack([a * cos - b * sin, b * cos + a * sin], -1).reshape(-1)

    np.testing.assert_allclose(rotate_adjacent(permute_qk(q, heads)), permute_qk(rotate_half(q), heads))


# ---------------------------------------------------------------- tiny models through GGUF

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
         "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def write_like_llama_cpp(hf, family: str, path, qtype=Q.F32, extra_kv=None) -> None:
    """Convert an HF model to GGUF the way convert_hf_to_gguf.py does (names from gguf-py's map)."""
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    kv = dict(add_block_count=c.num_hidden_layers, add_context_length=c.max_position_embeddings,
              add_embedding_length=c.hidden_size, add_feed_forward_length=c.intermediate_size,
              add_head_count=c.num_attention_heads, add_head_count_kv=c.num_key_value_heads,
              add_layer_norm_rms_eps=c.rms_norm_eps, add_vocab_size=c.vocab_size, add_key_length=head_dim,
              add_value_length=head_dim, add_rope_freq_base=rope["rope_theta"], add_bos_token_id=1,
              add_eos_token_id=2, **(extra_kv or {}))
    if family == "gemma3":
        kv["add_sliding_window"] = c.sliding_window
    names = gguf.get_tensor_name_map(ARCHS[family], c.num_hidden_layers)
    tensors = {}
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        t = t.float().numpy().copy()
        if family == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_cpp_permute(t, c.num_attention_heads, c.num_attention_heads)
        if family == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_cpp_permute(t, c.num_attention_heads, c.num_key_value_heads)
        if family == "gemma3" and name.endswith("norm.weight"):
            t = t + 1.0  # Gemma3Model.norm_shift
        tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))] = (t, qtype if t.ndim == 2 else Q.F32)
    _write_gguf(path, gguf.MODEL_ARCH_NAMES[ARCHS[family]], tensors, kv)


def _our_logits(path, tokens) -> torch.Tensor:
    model, _ = load_model(str(path))
    driver = PagedDriver(model)
    rows = [driver.step([(0, tokens[:-3])])[0]] + [driver.step([(0, [t])])[0] for t in tokens[-3:]]
    return torch.cat(rows)


def _transformers_gguf_logits(path, tokens) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return hf_logits(model, tokens)


TINY_GGUF = {
    "llama": ("llama", dict(num_key_value_heads=1)),
    "llama_bias": ("llama", dict(attention_bias=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=128)),  # transformers reads no key_length for qwen3: 128 is its default
    # transformers' GGUF path assumes llama.cpp's Gemma 3 defaults (pattern 6, local theta 1e4,
    # query_pre_attn_scalar 256 == head_dim), so this config follows them
    "gemma3": ("gemma3", dict(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                              sliding_window=4, query_pre_attn_scalar=256)),
}


@pytest.mark.parametrize("variant", sorted(TINY_GGUF))
def test_tiny_gguf_matches_transformers(variant, tmp_path):
    family, overrides = TINY_GGUF[variant]
    hf = make_hf_model(family, seed=11, **overrides)
    path = tmp_path / f"{variant}.gguf"
    write_like_llama_cpp(hf, family, path)
    tokens = list(range(5, 19))
    ref = hf_logits(hf, tokens)
    assert (_our_logits(path, tokens) - ref).abs().max() < 1e-4
    if variant != "llama_bias":  # transformers' GGUF config mapping drops attention_bias
        assert (_transformers_gguf_logits(path, tokens) - ref).abs().max() < 1e-4


def test_quantized_tiny_gguf_matches_transformers_gguf_loader(tmp_path):
    hf = make_hf_model("llama", seed=12)
    path = tmp_path / "q8.gguf"
    write_like_llama_cpp(hf, "llama", path, qtype=Q.Q8_0)
    tokens = list(range(20, 33))
    ours, theirs = _our_logits(path, tokens), _transformers_gguf_logits(path, tokens)
    assert (ours - theirs).abs().max() < 1e-4
    # and Q8_0 stays close to the unquantized model
    ref = hf_logits(hf, tokens)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()


def test_gguf_sliding_window_pattern_and_metadata(tmp_path):
    hf = make_hf_model("gemma3", seed=13, num_hidden_layers=4, head_dim=32, sliding_window=4,
                       sliding_window_pattern=2, query_pre_attn_scalar=32, final_logit_softcapping=5.0)
    path = tmp_path / "g.gguf"
    pattern = [t == "sliding_attention" for t in hf.config.layer_types]
    write_like_llama_cpp(hf, "gemma3", path, extra_kv=dict(add_sliding_window_pattern=pattern,
                                                           add_final_logit_softcapping=5.0))
    config, state = load_gguf(path)
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["layer_types"] == hf.config.layer_types
    assert config["final_logit_softcapping"] == 5.0 and config["query_pre_attn_scalar"] == 32
    assert config["tie_word_embeddings"] and config["eos_token_id"] == [2] and config["bos_token_id"] == 1
    # norms come back without llama.cpp's +1
    torch.testing.assert_close(state["model.layers.0.input_layernorm.weight"],
                               hf.model.layers[0].input_layernorm.weight.detach(), rtol=0, atol=1e-6)
    tokens = list(range(3, 17))
    assert (_our_logits(path, tokens) - hf_logits(hf, tokens)).abs().max() < 1e-4


def test_unsupported_gguf_architecture_is_rejected(tmp_path):
    _write_gguf(tmp_path / "x.gguf", "gpt2", {"token_embd.weight": (np.zeros((4, 8), np.float32), Q.F32)})
    with pytest.raises(ValueError, match="not supported"):
        load_model(str(tmp_path / "x.gguf"))


# ---------------------------------------------------------------- the real SmolLM2 file

@pytest.fixture(scope="module")
def smollm2(hf_smollm):
    """Our load of the bundled GGUF next to transformers' (``hf_smollm``: tests/conftest.py, session-wide)."""
    ours, config = load_model(default_model_path())
    return ours, config, hf_smollm


@pytest.mark.slow
def test_smollm2_config_from_gguf_metadata(smollm2):
    _, config, _ = smollm2
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (30, 576, 9, 3, 64)
    assert (config.vocab_size, config.intermediate_size, config.max_position_embeddings) == (49152, 1536, 8192)
    assert config.tie_word_embeddings and config.rope_theta == 100_000.0 and config.rope_scaling is None
    assert config.bos_token_id == 1 and config.eos_token_ids == [2]


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_dequantization(smollm2):
    ours, _, hf = smollm2
    for i in (0, 29):
        attn, ref = ours.model.layers[i].self_attn, hf.model.layers[i].self_attn
        expected = torch.cat([ref.q_proj.weight, ref.k_proj.weight, ref.v_proj.weight])
        assert torch.equal(attn.qkv_proj.weight, expected)
        mlp, ref_mlp = ours.model.layers[i].mlp, hf.model.layers[i].mlp
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([ref_mlp.gate_proj.weight, ref_mlp.up_proj.weight]))
    assert torch.equal(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight)


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    ours, _, hf = smollm2
    driver = PagedDriver(ours, num_pages=16, page_size=4)
    tokens = list(CHAT_PROMPT)
    rows = [driver.step([(0, tokens)])[0]]
    for _ in range(3):
        tokens.append(int(rows[-1][-1].argmax()))
        rows.append(driver.step([(0, [tokens[-1]])])[0])
    got = torch.cat(rows)[: len(tokens) - 1]
    ref = hf_logits(hf, tokens)[: len(tokens) - 1]
    assert (got - ref).abs().max() < ATOL
    assert ref[len(CHAT_PROMPT) - 1:].argmax(-1).tolist() == tokens[len(CHAT_PROMPT):]
