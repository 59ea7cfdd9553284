"""The Q8_0 small-batch linear (the LM head): a GGUF's Q8_0 blocks read exactly, repacked, and
multiplied by block-quantized activations in C++ exactly as the PyTorch reference does; the loader
hands the LM head (tied or not) its blocks, and the default model decodes on them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from common.engine import LLM, SamplingParams
from common.models.q8_head import packed_q8_head
from common.models.registry import load_model
from common.weights.gguf_loader import read_q8_rows
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import Q8_MAX_ROWS, PackedLinear, packed_linear_supported
from kernels.q8_pack import Q8Rows, pack_q8, q8_linear_reference, unpack_q8
from _model_helpers import make_hf_model
from test_gguf_loader import write_like_llama_cpp

Q = gguf.GGMLQuantizationType
EXT = cpu_ops_module()
needs_ext = pytest.mark.skipif(EXT is None or not packed_linear_supported(torch.bfloat16),
                               reason="needs the C++ CPU kernels and oneDNN bf16")


def _q8_rows(n: int, k: int, seed: int = 0) -> tuple[Q8Rows, torch.Tensor]:
    """A random matrix quantized by gguf-py, as Q8Rows and as gguf-py's own dequantization."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.Q8_0)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0).reshape(n, k).astype(np.float32))
    return Q8Rows.from_ggml(raw, (n, k)), exact


def _extreme_rows(n: int, k: int, seed: int = 0) -> Q8Rows:
    """Every int8 value (-128 included, which ggml's quantizer never writes but the format allows),
    some all-zero rows and blocks with a zero scale."""
    g = torch.Generator().manual_seed(seed)
    qs = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
    qs[0] = -128
    qs[1] = 127
    qs[2] = 0
    d = (torch.rand(n, k // 32, generator=g) * 0.02).to(torch.float16)
    d[3] = 0
    return Q8Rows(qs.contiguous(), d.contiguous())


def test_rows_hold_the_exact_ggml_weights():
    rows, exact = _q8_rows(24, 96)
    assert rows.qs.dtype == torch.int8 and rows.d.dtype == torch.float16 and rows.shape == (24, 96)
    assert torch.equal(rows.dequantize(), exact)
    perm = torch.randperm(24)
    assert torch.equal(rows.select_rows(perm).dequantize(), exact[perm])
    with pytest.raises(ValueError, match="K % 32"):
        Q8Rows.from_ggml(np.zeros(34 * 3, dtype=np.uint8), (2, 48))


def test_pack_layout_puts_16_rows_of_4_weights_in_each_chunk_and_round_trips():
    rows = _extreme_rows(20, 64)  # 2 tiles, the second padded with 12 zero rows
    packed = pack_q8(rows)
    assert packed.shape == (2, 2, 544) and packed.dtype == torch.uint8
    t, b, c, i, j = 1, 1, 5, 3, 2
    row, col = 16 * t + i, 32 * b + 4 * c + j
    assert int(packed[t, b, 32 + 64 * c + 4 * i + j]) == int(rows.qs[row, col]) + 128
    assert packed[t, b, :32].view(torch.float16)[i] == rows.d[row, b]
    padding = packed[1, :, 32:].reshape(2, 8, 16, 4)[:, :, 4:, :]
    assert (padding == 128).all() and not packed[1, :, :32].view(torch.float16)[:, 4:].any()
    back = unpack_q8(packed, 20)
    assert torch.equal(back.qs, rows.qs) and torch.equal(back.d, rows.d)


def test_reference_is_close_to_the_fp32_product():
    rows, exact = _q8_rows(32, 128)
    x = torch.randn(3, 128)
    ref = q8_linear_reference(x, rows)
    full = x @ exact.t()
    assert (ref - full).abs().max() <= 0.02 * full.abs().max()


def test_parse_matches_gguf_on_the_default_models_embedding(smollm_path):
    """The real file's token_embd.weight (Q8_0) against gguf-py's own dequantization, a few rows."""
    reader = gguf.GGUFReader(smollm_path)
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == Q.Q8_0
    n, k = int(tensor.shape[1]), int(tensor.shape[0])
    picks = [0, 1, 2, 1000, 31337, n - 1]
    raw = np.asarray(tensor.data)[picks]  # [rows, K / 32 * 34] bytes
    want = torch.from_numpy(gguf.quants.dequantize(raw, Q.Q8_0).reshape(len(picks), k).astype(np.float32))
    assert torch.equal(Q8Rows.from_ggml(raw, (len(picks), k)).dequantize(), want)
    head = read_q8_rows(reader, names=["model.embed_tokens.weight"])
    assert list(head) == ["model.embed_tokens.weight"] and head["model.embed_tokens.weight"].shape == (n, k)
    assert torch.equal(head["model.embed_tokens.weight"].select_rows(picks).dequantize(), want)


@needs_ext
@pytest.mark.parametrize("n,k", [(40, 64), (37, 576), (16, 64)])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16])
def test_kernel_matches_reference(n, k, m):
    rows, _ = _q8_rows(n, k, seed=n + k)
    packed = pack_q8(rows)
    for bias in (None, torch.randn(n)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            got = EXT.q8_linear(x, packed, n, bias)
            want = q8_linear_reference(x.float(), rows, bias)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert got.shape == (m, n) and got.dtype == dtype
            assert (got.float() - want).abs().max() <= tol * want.abs().max() + 1e-6, (dtype, m, bias is None)


@needs_ext
@pytest.mark.parametrize("m", [1, 4, 6])
def test_kernel_on_extreme_weights_and_zero_rows(m):
    rows = _extreme_rows(50, 576, seed=m)
    packed = pack_q8(rows)
    x = torch.randn(m, 576) * 4
    x[0] = 0  # a zero activation row: scale 0
    x[-1, :32] = 0  # ... and a zero block
    got = EXT.q8_linear(x, packed, 50, None)
    want = q8_linear_reference(x, rows)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not got[0].any() and not got[:, 2].any()
    assert EXT.q8_linear(torch.empty(0, 576), packed, 50, None).shape == (0, 50)


@needs_ext
def test_kernel_rejects_bad_shapes():
    packed = pack_q8(_q8_rows(32, 64)[0])
    with pytest.raises(RuntimeError, match="K must be"):
        EXT.q8_linear(torch.randn(1, 96), packed, 32, None)
    with pytest.raises(RuntimeError, match="out_features"):
        EXT.q8_linear(torch.randn(1, 64), packed, 40, None)
    with pytest.raises(RuntimeError, match="544"):
        EXT.q8_linear(torch.randn(1, 64), torch.zeros(2, 2, 320, dtype=torch.uint8), 32, None)


@needs_ext
def test_packed_linear_runs_small_batches_on_q8_and_keeps_it_in_its_state():
    rows, exact = _q8_rows(48, 64)
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(exact.to(torch.bfloat16))
    packed = PackedLinear(lin, int8_max_rows=4, w8a8=True, q8=pack_q8(rows))
    assert "q8=True" in repr(packed)
    assert packed.runs_q8(1) and packed.runs_q8(Q8_MAX_ROWS) and not packed.runs_q8(Q8_MAX_ROWS + 1)
    assert not packed.runs_w8a8(Q8_MAX_ROWS) and packed.runs_w8a8(Q8_MAX_ROWS + 1)
    x = torch.randn(5, 64, dtype=torch.bfloat16)  # past int8_max_rows: still the Q8_0 kernel
    want = q8_linear_reference(x.float(), rows)
    assert (packed(x).float() - want).abs().max() <= 1e-2 * want.abs().max()
    again = PackedLinear(lin, int8_max_rows=4, w8a8=True, int8_state=packed.int8_state())
    assert again._q8 is not None and torch.equal(again(x), packed(x))
    with pytest.raises(ValueError, match="Q8_0 weights"):
        PackedLinear(lin, int8_max_rows=4, q8=torch.zeros(2, 2, 544, dtype=torch.uint8))


@needs_ext
@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True)])
def test_loader_gives_the_head_its_exact_blocks(family, tied, tmp_path, monkeypatch):
    """A tiny model written as llama.cpp does with Q8_0 matrices: the head (``output.weight``, or the
    tied ``token_embd.weight``) runs on its blocks and matches the fp32 model's head."""
    monkeypatch.setenv("XLLM_INT8_GEMM", "0")  # no W8A8 calibration: the file has no tokenizer
    hf = make_hf_model(family, seed=7, tie_word_embeddings=tied)
    path = tmp_path / f"tiny-{family}-q8.gguf"
    write_like_llama_cpp(hf, family, path, qtype=Q.Q8_0)
    reader = gguf.GGUFReader(str(path))
    source = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert sorted(packed_q8_head(read_q8_rows(reader), tied)) == ["lm_head"]
    fp32, _ = load_model(str(path), dtype=torch.float32)
    bf16, _ = load_model(str(path), dtype=torch.bfloat16)
    head = bf16.lm_head
    assert isinstance(head, PackedLinear) and "q8=True" in repr(head)
    rows = read_q8_rows(reader, names=[source])[source]
    x = torch.randn(3, head.in_features)
    got = head(x.to(torch.bfloat16)).float()
    assert (got - q8_linear_reference(x.to(torch.bfloat16).float(), rows)).abs().max() <= 1e-2 * got.abs().max()
    want = fp32.compute_logits(x)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
    monkeypatch.setenv("XLLM_Q8_HEAD", "0")
    off, _ = load_model(str(path), dtype=torch.bfloat16)
    assert isinstance(off.lm_head, PackedLinear) and off.lm_head._q8 is None


@needs_ext
def test_default_model_decodes_on_the_q8_head(smollm_path, monkeypatch):
    """bf16 greedy output on the file's Q8_0 head reads as text, and starts as on the int8 copy."""
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("XLLM_Q8_HEAD", flag)
        llm = LLM(smollm_path, dtype="bfloat16", kv_cache_memory="32MiB", max_num_batched_tokens=256)
        head = llm.engine.model.lm_head
        assert isinstance(head, PackedLinear) and (head._q8 is not None) == (flag == "1")
        ids = llm.tokenizer.encode_chat(prompt)
        runs[flag] = llm.generate([ids], params)[0]
        del llm
    on, off = runs["1"], runs["0"]
    assert on.token_ids[0] == off.token_ids[0]
    assert "Paris" in on.text, on.text
