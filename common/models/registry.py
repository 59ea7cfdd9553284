"""Pick a model class for a checkpoint and load its weights (GGUF file or HF directory)."""

from __future__ import annotations

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


def _is_quantized_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF whose weight matrices are stored quantized (Q8_0, Q4_1, K-quants...)."""
    if not (path.is_file() and path.suffix == ".gguf"):
        return False
    import gguf

    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return any(t.tensor_type not in plain for t in gguf.GGUFReader(str(path)).tensors)


def int8_decode_rows(path: Path, dtype: torch.dtype) -> int:
    """How many rows a linear runs on int8 weights (0 = never).

    Only in bf16, and by default only for checkpoints that were quantized already (int8 rows
    add far less error than the source's own 4-8 bit blocks); ``XLLM_INT8_DECODE=0``/``1``
    forces it off/on for bf16.
    """
    if dtype != torch.bfloat16:
        return 0
    forced = os.environ.get("XLLM_INT8_DECODE")
    enabled = forced != "0" if forced is not None else _is_quantized_gguf(path)
    return DEFAULT_INT8_MAX_ROWS if enabled else 0


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, ModelConfig]:
    """Build the model for ``path`` (a ``.gguf`` file or an HF dir) with its weights loaded.

    The module is in eval mode with gradients off; weights are in ``dtype`` on ``device``.
    Prepacked bf16 linears of a quantized GGUF also keep int8 weights for small decode
    batches (see :func:`int8_decode_rows`).
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
    packed = model.pack_linears(int8_decode_rows(Path(path), dtype))
    logger.info("loaded %s (%s, %d prepacked linears) from %s in %.1fs", cls.__name__, dtype, packed, path,
                time.perf_counter() - start)
    return model, config


