"""Pick a model class for a checkpoint and load its weights (GGUF file or HF directory)."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from pathlib import Path

import torch
import torch.nn as nn

from common.default_model import default_model_path
from common.models.config import ModelConfig
from common.models.gemma3 import Gemma3ForCausalLM
from common.models.int8_calibration import calibrate_int8_gemms, calibration_token_ids
from common.models.layers import DecoderForCausalLM
from common.models.llama import LlamaForCausalLM, MistralForCausalLM
from common.models.qwen2 import Qwen2ForCausalLM
from common.models.qwen3 import Qwen3ForCausalLM
from kernels.linear import DEFAULT_INT8_MAX_ROWS

logger = logging.getLogger(__name__)

__all__ = ["MODEL_CLASSES", "model_class_for", "fuse_hf_state_dict", "load_model", "default_model_path"]

MODEL_CLASSES: dict[str, type[DecoderForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}
_CLASS_BY_MODEL_TYPE = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
}


_FUSED_ATTN = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(q|k|v)_proj\.(weight|bias)$")
_FUSED_MLP = re.compile(r"^(model\.layers\.\d+\.mlp)\.(gate|up)_proj\.(weight|bias)$")


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

    Consumes ``state`` (pops as it goes) so the unfused copies can be freed early.
    """
    fused: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name in list(state):
        tensor = state.pop(name)
        if name.endswith("rotary_emb.inv_freq"):
            continue  # old checkpoints saved this buffer; it is recomputed
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        m = _FUSED_ATTN.match(name) or _FUSED_MLP.match(name)
        if m is None:
            fused[name] = tensor
            continue
        prefix, part, kind = m.groups()
        target = f"{prefix}.qkv_proj.{kind}" if part in ("q", "k", "v") else f"{prefix}.gate_up_proj.{kind}"
        order = ("q", "k", "v") if part in ("q", "k", "v") else ("gate", "up")
        group = pending.setdefault(target, {})
        group[part] = tensor
        if len(group) == len(order):
            fused[target] = torch.cat([group[p] for p in order], dim=0)
            del pending[target]
    if pending:
        raise ValueError(f"incomplete projections in checkpoint: {sorted(pending)}")
    return fused


def _read_checkpoint(path: Path, dtype: torch.dtype, device: torch.device | str) -> tuple[dict, dict]:
    if path.is_file() and path.suffix == ".gguf":
        from common.weights.gguf_loader import load_gguf

        return load_gguf(path, dtype=dtype, device=device)
    if path.is_dir():
        from common.weights.safetensors_loader import load_safetensors_dir

        return load_safetensors_dir(path, dtype=dtype, device=device)
    raise FileNotFoundError(f"{path} is neither a .gguf file nor a model directory")


@functools.lru_cache(maxsize=8)
def _is_quantized_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF whose weight matrices are stored quantized (Q8_0, Q4_1, K-quants...)."""
    if not (path.is_file() and path.suffix == ".gguf"):
        return False
    import gguf

    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return any(t.tensor_type not in plain for t in gguf.GGUFReader(str(path)).tensors)


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
) -> tuple[nn.Module, ModelConfig]:
    """Build the model for ``path`` (a ``.gguf`` file or an HF dir) with its weights loaded.

    The module is in eval mode with gradients off; weights are in ``dtype`` on ``device``.
    Prepacked bf16 linears of a quantized GGUF also keep int8 weights, for small decode
    batches and for int8 GEMMs on larger ones (see :func:`int8_decode_rows`, :func:`int8_gemm_enabled`).
    """
    start = time.perf_counter()
    config_dict, state = _read_checkpoint(Path(path), dtype, device)
    config = ModelConfig.from_hf_dict(config_dict)
    cls = model_class_for(config)
    fused = fuse_hf_state_dict(state, config)
    # Build on the meta device: no time spent on random init, weights are assigned as loaded.
    with torch.device("meta"):
        model = cls(config)
    missing, unexpected = model.load_state_dict(fused, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {cls.__name__}: missing={missing} unexpected={unexpected}")
    model.eval()
    model.requires_grad_(False)
    w8a8 = int8_gemm_enabled(Path(path), dtype)
    packed = model.pack_linears(int8_decode_rows(Path(path), dtype), w8a8)
    if w8a8:
        calibrate_int8_gemms(model, calibration_token_ids(path))
    logger.info("loaded %s (%s, %d prepacked linears) from %s in %.1fs", cls.__name__, dtype, packed, path,
                time.perf_counter() - start)
    return model, config


