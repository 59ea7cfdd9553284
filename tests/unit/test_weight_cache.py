"""The on-disk weight cache: a warm load is bit-identical to a cold one (weights, int8 copies,
calibrated smoothing, greedy output); a damaged or stale entry is ignored, logged and rebuilt; the
key changes with whatever changes the packed result."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import common.models.registry as registry
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.models.registry import load_model
from common.weights.cache import cache_key, default_cache_dir, model_fingerprint
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import PackedLinear, packed_linear_supported
from _model_helpers import make_hf_model, save_hf_model

INT8 = cpu_ops_module() is not None and packed_linear_supported(torch.bfloat16)
needs_int8 = pytest.mark.skipif(not INT8, reason="needs the C++ CPU kernels and oneDNN bf16 GEMMs")
CALIBRATION = [1, 5, 9, 33, 70, 2, 8, 100, 42, 7, 200, 3, 17, 64]


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    return save_hf_model(make_hf_model("llama", seed=3), tmp_path / "tiny-llama")


@pytest.fixture
def int8_on(monkeypatch):
    """W8A8 + weight-only int8 forced on for the tiny HF model; calibration on fixed ids (the tiny
    checkpoint has no tokenizer)."""
    monkeypatch.setenv("XLLM_INT8_GEMM", "1")
    monkeypatch.setenv("XLLM_INT8_DECODE", "1")
    monkeypatch.setattr(registry, "calibration_token_ids", lambda path: list(CALIBRATION))


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, buffer and int8 tensor (the GEMM weight as the kernel sees it, strides too)."""
    out = {f"p/{k}": v for k, v in model.named_parameters()}
    out.update({f"b/{k}": v for k, v in model.named_buffers() if v is not None})
    for name, m in model.named_modules():
        if isinstance(m, PackedLinear) and (m.int8_max_rows or m.w8a8):
            out.update({f"i/{name}/{k}": v for k, v in m.int8_state().items()})
            out[f"g/{name}"] = m._gemm_q
    return out


def _assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and ta[name].stride() == tb[name].stride(), name
        assert torch.equal(ta[name], tb[name]), name


def _entries(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.safetensors"))


@needs_int8
def test_cold_then_warm_is_bit_identical(model_dir, int8_on, tmp_path):
    cache_dir = tmp_path / "cache"
    cold, _ = load_model(model_dir, torch.bfloat16, cache_dir=cache_dir)
    assert cold.load_timings["cache"] == "miss" and "calibrate" in cold.load_timings
    assert len(_entries(cache_dir)) == 1
    warm, _ = load_model(model_dir, torch.bfloat16, cache_dir=cache_dir)
    assert warm.load_timings["cache"] == "hit" and "calibrate" not in warm.load_timings
    smoothed = [m for m in warm.modules() if isinstance(m, PackedLinear) and m.w8a8]
    assert smoothed and all(m._inv_smooth is not None for m in smoothed)
    _assert_identical(cold, warm)
    tokens = list(range(3, 40))  # > int8_max_rows: the W8A8 GEMMs run
    assert torch.equal(cold.score(tokens), warm.score(tokens))
    uncached, _ = load_model(model_dir, torch.bfloat16)
    assert uncached.load_timings["cache"] == "off"
    _assert_identical(uncached, warm)


@needs_int8
@pytest.mark.parametrize("qtype,blocks", [("Q4_1", "q4"), ("Q8_0", "q8")])
def test_a_ggufs_own_blocks_come_back_bit_identical(int8_on, tmp_path, qtype, blocks):
    """A quantized GGUF's packed blocks (4-bit decoder linears and head; a Q8_0 head) are cached with
    the int8 state and restored bit for bit."""
    import gguf

    from test_gguf_loader import write_like_llama_cpp

    path = tmp_path / f"tiny-{qtype}.gguf"
    write_like_llama_cpp(make_hf_model("llama", seed=4), "llama", path, qtype=gguf.GGMLQuantizationType[qtype])
    cache_dir = tmp_path / "cache"
    cold, _ = load_model(str(path), torch.bfloat16, cache_dir=cache_dir)
    warm, _ = load_model(str(path), torch.bfloat16, cache_dir=cache_dir)
    assert (cold.load_timings["cache"], warm.load_timings["cache"]) == ("miss", "hit")
    assert blocks in warm.lm_head.int8_state() and f"{blocks}=True" in repr(warm.lm_head)
    _assert_identical(cold, warm)
    for rows in (1, 5, 40):  # the block kernels, then W8A8
        tokens = list(range(3, 3 + rows))
        assert torch.equal(cold.score(tokens), warm.score(tokens))


def _greedy(model_dir: str, cache_dir: Path | str | None, dtype: str) -> tuple[str, list[int], LLMEngine]:
    engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, kv_cache_memory="4MiB",
                                    weight_cache=cache_dir is not None, weight_cache_dir=str(cache_dir or "")))
    engine.add_request("r", [5, 17, 99, 3, 42, 7, 8, 9], SamplingParams(max_tokens=12, temperature=0.0,
                                                                        ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    return engine.model.load_timings["cache"], tokens, engine


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_int8)])
def test_engine_greedy_output_is_the_same_cold_and_warm(model_dir, int8_on, tmp_path, dtype):
    cache_dir = tmp_path / "cache"
    off, ref, _ = _greedy(model_dir, None, dtype)
    cold, cold_tokens, cold_engine = _greedy(model_dir, cache_dir, dtype)
    warm, warm_tokens, warm_engine = _greedy(model_dir, cache_dir, dtype)
    assert (off, cold, warm) == ("off", "miss", "hit")
    assert len(ref) == 12 and cold_tokens == ref and warm_tokens == ref
    _assert_identical(cold_engine.model, warm_engine.model)


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "garbage", "stale_key"])
def test_a_damaged_or_stale_entry_is_ignored_and_rebuilt(model_dir, tmp_path, caplog, damage):
    cache_dir = tmp_path / "cache"
    ref, _ = load_model(model_dir, torch.float32, cache_dir=cache_dir)
    (entry,) = _entries(cache_dir)
    data = bytearray(entry.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip_data_byte":
        data[-100] ^= 0x40  # inside the last tensor: only the checksum can tell
    elif damage == "garbage":
        data = bytearray(b"\x00not a safetensors file" * 10)
    else:  # an entry whose recorded key is not this load's (e.g. a digest-prefix collision)
        data = None
        with safe_open(str(entry), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta["xllm_key"] = json.dumps(cache_key(model_fingerprint(model_dir), {"other": 1})[1], sort_keys=True)
        save_file(tensors, str(entry), metadata=meta)
    if data is not None:
        entry.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="common.weights.cache"):
        again, _ = load_model(model_dir, torch.float32, cache_dir=cache_dir)
    assert again.load_timings["cache"] == "miss"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "ignoring weight cache entry" in warnings[0].getMessage()
    _assert_identical(ref, again)
    # ... and rebuilt: the next load hits, with the same numbers.
    third, _ = load_model(model_dir, torch.float32, cache_dir=cache_dir)
    assert third.load_timings["cache"] == "hit"
    _assert_identical(ref, third)


def test_the_key_changes_with_dtype_model_and_content(model_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    load_model(model_dir, torch.float32, cache_dir=cache_dir)
    load_model(model_dir, torch.bfloat16, cache_dir=cache_dir)
    assert len(_entries(cache_dir)) == 2  # one per dtype
    other = save_hf_model(make_hf_model("llama", seed=4), tmp_path / "other")
    load_model(other, torch.float32, cache_dir=cache_dir)
    assert len(_entries(cache_dir)) == 3

    fingerprint = model_fingerprint(model_dir)
    assert cache_key(fingerprint, {"dtype": "a"})[0] != cache_key(fingerprint, {"dtype": "b"})[0]
    # Same size and mtime, other bytes: the sampled hash still tells them apart.
    weights = next(Path(model_dir).glob("*.safetensors"))
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0x01
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_fingerprint(model_dir) != fingerprint
    # A touched file (new mtime) is another file as well.
    changed = model_fingerprint(model_dir)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert model_fingerprint(model_dir) not in (fingerprint, changed)


def test_an_unwritable_cache_only_costs_the_cache(model_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="common.weights.cache"):
        model, _ = load_model(model_dir, torch.float32, cache_dir=blocker / "cache")
    assert model.load_timings["cache"] == "miss"
    assert any("cannot write weight cache entry" in r.getMessage() for r in caplog.records)


def test_settings_pick_the_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("XLLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "xllm" / "weights"
    monkeypatch.setenv("XLLM_CACHE_DIR", str(tmp_path / "x"))
    assert EngineConfig().resolved_weight_cache_dir() == str(tmp_path / "x" / "weights")
    assert EngineConfig(weight_cache=False).resolved_weight_cache_dir() is None
    assert EngineConfig(weight_cache_dir="").resolved_weight_cache_dir() is None
    assert EngineConfig(weight_cache_dir="/somewhere").resolved_weight_cache_dir() == "/somewhere"


@needs_int8
def test_int8_state_round_trip_and_shape_check():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).to(torch.bfloat16)
    a = PackedLinear(lin, int8_max_rows=4, w8a8=True)
    a.smooth(torch.rand(32) * 10)
    b = PackedLinear(lin, int8_max_rows=4, w8a8=True, int8_state=a.int8_state())
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x[:2]), b(x[:2]))
    bad = {**a.int8_state(), "q": torch.zeros(48, 31, dtype=torch.int8)}
    with pytest.raises(ValueError, match="does not fit"):
        PackedLinear(lin, int8_max_rows=4, w8a8=True, int8_state=bad)
