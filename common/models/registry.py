"""Pick a model class for a checkpoint and load its weights (GGUF file or HF directory)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.default_model import default_model_path
from common.models.config import ModelConfig
from common.models.fused_projections import fused_part
from common.models.gemma3 import Gemma3ForCausalLM
from common.models.int8_calibration import (
    CALIBRATION_CHAT,
    CALIBRATION_VERSION,
    calibrate_int8_gemms,
    calibration_token_ids,
)
from common.models.layers import DecoderForCausalLM
from common.models.llama import LlamaForCausalLM, MistralForCausalLM
from common.models.mixtral import MixtralForCausalLM
from common.models.moe import fuse_expert_tensors
from common.models.q4_linears import packed_q4_linears, q4_decode_enabled
from common.models.q8_head import head_source, packed_q8_head, q8_head_enabled
from common.models.qwen2 import Qwen2ForCausalLM
from common.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from common.models.qwen3 import Qwen3ForCausalLM
from common.models.qwen3_moe import Qwen3MoeForCausalLM
from common.models.vision import VisionTransformer
from common.weights.cache import CachedModel, WeightCache, cache_key, model_fingerprint
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import DEFAULT_INT8_MAX_ROWS, PackedLinear, packed_linear_supported

logger = logging.getLogger(__name__)

__all__ = ["MODEL_CLASSES", "model_class_for", "fuse_hf_state_dict", "load_model", "load_vision_tower",
           "default_model_path"]

MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}
_CLASS_BY_MODEL_TYPE = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}
# transformers v5 names VL weights by module path when it does not convert them back on save
_HF_PREFIX_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))




def model_class_for(config: ModelConfig) -> type[DecoderForCausalLM]:
    cls = MODEL_CLASSES.get(config.architecture) or _CLASS_BY_MODEL_TYPE.get(config.model_type)
    if cls is None:
        raise ValueError(
            f"unsupported model: architecture={config.architecture!r} model_type={config.model_type!r}; "
            f"supported: {sorted(MODEL_CLASSES)}"
        )
    return cls


def fuse_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensor names -> this engine's: q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``.

    Consumes ``state`` (pops as it goes) so the unfused copies can be freed early. MoE experts
    are stacked per layer (:func:`common.models.moe.fuse_expert_tensors`).
    """
    if config.is_moe:
        state = fuse_expert_tensors(state, config.num_experts)
    fused: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name in list(state):
        tensor = state.pop(name)
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved this buffer; it is recomputed
        for alias, canonical in _HF_PREFIX_ALIASES:
            if name.startswith(alias):
                name = canonical + name[len(alias):]
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        where = fused_part(name)
        if where is None:
            fused[name] = tensor
            continue
        target, order = where.target, where.order
        group = pending.setdefault(target, {})
        group[where.part] = tensor
        if len(group) == len(order):
            fused[target] = torch.cat([group[p] for p in order], dim=0)
            del pending[target]
    if pending:
        raise ValueError(f"incomplete projections in checkpoint: {sorted(pending)}")
    return fused


def _read_checkpoint(path: Path, dtype: torch.dtype,
                     device: torch.device | str) -> tuple[dict, dict, dict, dict]:
    """(HF config dict, HF state dict, packed 4-bit weights by linear name: see
    common.models.q4_linears, packed Q8_0 head: see common.models.q8_head)."""
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        from common.weights.gguf_loader import is_quantized, load_gguf, read_q4_rows, read_q8_rows

        reader = gguf.GGUFReader(str(path))
        _quantized_gguf[path] = is_quantized(reader)  # one parse of the file, not two
        config, state = load_gguf(path, dtype=dtype, device=device, reader=reader)
        q4, q8 = {}, {}
        on_cpu = torch.device(device).type == "cpu" and cpu_ops_module() is not None
        if q4_decode_enabled(dtype) and on_cpu:
            q4 = packed_q4_linears(read_q4_rows(reader))
        if q8_head_enabled(dtype) and on_cpu:
            tied = bool(config.get("tie_word_embeddings"))
            q8 = packed_q8_head(read_q8_rows(reader, names=[head_source(tied)]), tied)
        return config, state, q4, q8
    if path.is_dir():
        from common.weights.safetensors_loader import load_safetensors_dir

        return *load_safetensors_dir(path, dtype=dtype, device=device), {}, {}
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a model directory")


_quantized_gguf: dict[Path, bool] = {}  # by path, for this process (as the lru_cache it replaces)


def _is_quantized_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF whose weight matrices are stored quantized (Q8_0, Q4_1, K-quants...)."""
    if not (path.is_file() and path.suffix == ".gguf"):
        return False
    found = _quantized_gguf.get(path)
    if found is None:
        import gguf

        from common.weights.gguf_loader import is_quantized

        found = _quantized_gguf[path] = is_quantized(gguf.GGUFReader(str(path)))
    return found


def _int8_enabled(path: Path, dtype: torch.dtype, env: str) -> bool:
    """bf16 only; by default for checkpoints that were quantized already (int8 rows add far
    less error than the source's own 4-8 bit blocks); ``env=0``/``1`` forces it off/on."""
    if dtype != torch.bfloat16:
        return False
    forced = os.environ.get(env)
    return forced != "0" if forced is not None else _is_quantized_gguf(path)


def int8_decode_rows(path: Path, dtype: torch.dtype) -> int:
    """How many rows a linear runs on weight-only int8 (0 = never); ``XLLM_INT8_DECODE``."""
    return DEFAULT_INT8_MAX_ROWS if _int8_enabled(path, dtype, "XLLM_INT8_DECODE") else 0


def int8_gemm_enabled(path: Path, dtype: torch.dtype) -> bool:
    """Whether larger batches run W8A8 int8 GEMMs (per-row activation scales); ``XLLM_INT8_GEMM``."""
    return _int8_enabled(path, dtype, "XLLM_INT8_GEMM")


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[nn.Module, ModelConfig]:
    """Build the model for ``path`` (a ``.gguf`` file or an HF dir) with its weights loaded.

    The module is in eval mode with gradients off; weights are in ``dtype`` on ``device``.
    Prepacked bf16 linears of a quantized GGUF also keep int8 weights, for small decode
    batches and for int8 GEMMs on larger ones (see :func:`int8_decode_rows`, :func:`int8_gemm_enabled`).

    With ``cache_dir`` (CPU only) the dequantized weights and the int8 state (quantized copies,
    calibrated smoothing) are kept on disk (:mod:`common.weights.cache`): a later load of the same
    file with the same settings reads them back instead of recomputing them, bit for bit the same.
    ``model.load_timings`` says where the time went (seconds per phase, and ``cache``: hit/miss/off).
    """
    start = time.perf_counter()
    timings: dict[str, Any] = {"cache": "off"}
    cache = key = None
    if cache_dir and torch.device(device).type == "cpu":
        cache, key = _open_cache(Path(path), Path(cache_dir), dtype, timings)
    model = _load_cached(cache, key, path, timings) if cache is not None else None
    if model is None:
        model, entry = _build(path, dtype, device, timings)
        if cache is not None:
            t = time.perf_counter()
            cache.store(key[0], key[1], path, entry)
            timings["cache_store"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    model.load_timings = timings
    logger.info("loaded %s (%s, %d prepacked linears, weight cache %s) from %s in %.1fs", type(model).__name__,
                dtype, timings.get("packed", 0), timings["cache"], path, timings["total"])
    return model, model.config


def _build(path: str, dtype: torch.dtype, device: torch.device | str,
           timings: dict[str, Any]) -> tuple[nn.Module, CachedModel]:
    """Read, dequantize, pack and calibrate (the uncached path); also returns what a cache keeps."""
    t = time.perf_counter()
    config_dict, state, q4, q8 = _read_checkpoint(Path(path), dtype, device)
    timings["read"] = time.perf_counter() - t
    config = ModelConfig.from_hf_dict(config_dict)
    fused = fuse_hf_state_dict(state, config)
    t = time.perf_counter()
    model = _assemble(config, fused)
    timings["build"] = time.perf_counter() - t
    t = time.perf_counter()
    rows, w8a8 = int8_decode_rows(Path(path), dtype), int8_gemm_enabled(Path(path), dtype)
    timings["packed"] = model.pack_linears(rows, w8a8, q4_weights=q4 if rows else None, q8_weights=q8 if rows else None)
    timings["pack"] = time.perf_counter() - t
    if w8a8:
        t = time.perf_counter()
        calibrate_int8_gemms(model, calibration_token_ids(path))
        timings["calibrate"] = time.perf_counter() - t
    int8 = {name: m.int8_state() for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    meta = {"int8_max_rows": rows, "w8a8": w8a8, "packed": timings["packed"]}
    return model, CachedModel(config_dict, fused, {k: v for k, v in int8.items() if v}, meta)


def _assemble(config: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    cls = model_class_for(config)
    # Build on the meta device: no time spent on random init, weights are assigned as loaded.
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(dict(state), strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {cls.__name__}: missing={missing} unexpected={unexpected}")
    model.eval()
    model.requires_grad_(False)
    return model


def _open_cache(path: Path, cache_dir: Path, dtype: torch.dtype,
                timings: dict[str, Any]) -> tuple[WeightCache | None, tuple[str, dict] | None]:
    """The cache and this load's key, from everything the packed result depends on."""
    t = time.perf_counter()
    try:
        fingerprint = model_fingerprint(path)
    except OSError:
        return None, None  # the load itself will say what is wrong with the path
    options = {
        "dtype": str(dtype),
        "packed": packed_linear_supported(dtype),
        "cpu_ext": cpu_ops_module() is not None,  # without it nothing runs in int8
        "int8_env": [os.environ.get("XLLM_INT8_DECODE"), os.environ.get("XLLM_INT8_GEMM")],
        "q4_decode": q4_decode_enabled(dtype),
        "q8_head": q8_head_enabled(dtype),
        "int8_max_rows": DEFAULT_INT8_MAX_ROWS,
        "calibration": [CALIBRATION_VERSION, hashlib.sha256(json.dumps(CALIBRATION_CHAT).encode()).hexdigest()],
    }
    key = cache_key(fingerprint, options)
    timings["cache_key"] = time.perf_counter() - t
    return WeightCache(cache_dir), key


def _load_cached(cache: WeightCache, key: tuple[str, dict], path: str, timings: dict[str, Any]) -> nn.Module | None:
    """The model from its cache entry, or None (miss, or an entry that does not fit: logged)."""
    t = time.perf_counter()
    entry = cache.load(key[0], key[1], path)
    if entry is None:
        timings["cache"] = "miss"
        return None
    try:
        model = _assemble(ModelConfig.from_hf_dict(entry.config), entry.state)
        timings["cache_load"] = time.perf_counter() - t
        t = time.perf_counter()
        rows, w8a8 = int(entry.meta["int8_max_rows"]), bool(entry.meta["w8a8"])
        packed = model.pack_linears(rows, w8a8, entry.int8)
        with_int8 = {name for name, m in model.named_modules()
                     if isinstance(m, PackedLinear) and (m.int8_max_rows or m.w8a8)}
        if packed != entry.meta["packed"] or with_int8 != set(entry.int8):
            raise ValueError(f"{packed} packed linears with int8 {sorted(with_int8 ^ set(entry.int8))} "
                             f"do not match the entry")
        timings["pack"] = time.perf_counter() - t
    except Exception as exc:  # an entry that does not fit this code: rebuild it
        logger.warning("ignoring weight cache entry %s (%s); rebuilding it", cache.path_for(key[0], path), exc)
        timings["cache"] = "miss"
        return None
    timings["cache"], timings["packed"] = "hit", packed
    return model


def load_vision_tower(path: str, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> tuple[VisionTransformer, ModelConfig]:
    """Only the vision tower of a vision-language HF directory (an encoder process needs no
    language model): ``(tower, config)``; ``tower.encode_images`` as the full model's."""
    from common.weights.safetensors_loader import load_safetensors_dir

    config_dict, state = load_safetensors_dir(Path(path), dtype=dtype, device=device)
    config = ModelConfig.from_hf_dict(config_dict)
    if not config.is_multimodal:
        raise ValueError(f"{path} is not a vision-language model (architecture {config.architecture})")
    prefixes = ("visual.", "model.visual.")
    vision = {}
    for name, tensor in state.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                vision[name[len(prefix):]] = tensor
    with torch.device("meta"):
        tower = VisionTransformer(config.vision_config)
    missing, unexpected = tower.load_state_dict(vision, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"vision weights do not match: missing={missing} unexpected={unexpected}")
    tower.eval().requires_grad_(False)
    return tower.to(device), config
