"""Read a GGUF file (llama.cpp's format) into an HF-style config dict and state dict.

Weights are dequantized at load into the runtime dtype (``gguf.quants.dequantize`` handles
F32, F16, BF16, Q4_0, Q4_1, Q5_*, Q8_0 and the K-quants). Two llama.cpp conventions are
undone so the result is exactly what an HF checkpoint would hold:

* for the Llama family the converter permutes the rows of ``attn_q`` / ``attn_k`` (weights
  and biases) from HF's rotate-half layout to GPT-J's interleaved one; :func:`unpermute_qk`
  inverts :func:`permute_qk` (Qwen2/Qwen3/Gemma3 are stored unpermuted);
* Gemma 3's converter stores every ``*norm.weight`` as ``1 + weight``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar

import gguf
import numpy as np
import torch

from kernels.q4_pack import Q4Rows
from kernels.q8_pack import Q8Rows

logger = logging.getLogger(__name__)

BlockRows = TypeVar("BlockRows", Q4Rows, Q8Rows)

__all__ = [
    "load_gguf",
    "is_quantized",
    "gguf_config_dict",
    "read_gguf_fields",
    "dequantize_tensor",
    "read_q4_rows",
    "read_q8_rows",
    "permute_qk",
    "unpermute_qk",
    "SUPPORTED_GGUF_ARCHITECTURES",
]

# GGUF general.architecture -> (HF architecture, HF model_type)
SUPPORTED_GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
_PERMUTED_QK_ARCHITECTURES = {"llama"}
_NORM_SHIFT_ARCHITECTURES = {"gemma3"}
# llama.cpp hard-codes these for Gemma 3 when the file does not say otherwise
_GEMMA3_SLIDING_PATTERN = 6
_GEMMA3_LOCAL_ROPE_THETA = 10_000.0
_GEMMA3_27B_LAYERS = 62

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # MoE: the router and every expert of a layer stacked in one 3-D tensor each ([E, out, in])
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
# Gemma 3 has norms both sides of attention and of the MLP; ffn_norm is the one before the MLP.
_GEMMA3_BLOCK_TENSORS = {
    **_BLOCK_TENSORS,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_ROPE_FREQS = "rope_freqs.weight"


def permute_qk(weight: torch.Tensor | np.ndarray, n_head: int) -> torch.Tensor | np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: HF rotate-half rows -> interleaved pairs, per head.

    ``n_head`` is the number of heads the rows belong to (KV heads for ``attn_k``).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_qk(weight: torch.Tensor | np.ndarray, n_head: int) -> torch.Tensor | np.ndarray:
    """Inverse of :func:`permute_qk`."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_fields(reader: gguf.GGUFReader, keys: list[str] | None = None) -> dict[str, Any]:
    """Metadata values by key (all keys, or those given that exist)."""
    wanted = reader.fields.keys() if keys is None else [k for k in keys if k in reader.fields]
    return {k: reader.fields[k].contents() for k in wanted}


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _single(value: Any, key: str) -> Any:
    """Per-layer arrays must be uniform here (the supported families never vary per layer)."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF key {key} varies per layer ({value}); not supported")
        return value[0]
    return value


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """Float32 array in HF shape order (``[out, in]`` for matrices)."""
    data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _rope_scaling(reader: gguf.GGUFReader, arch: str, max_pos: int) -> dict | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {
            "rope_type": "yarn",
            "factor": factor,
            "original_max_position_embeddings": int(
                _field(reader, f"{arch}.rope.scaling.original_context_length", max_pos)
            ),
        }
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            value = _field(reader, f"{arch}.rope.scaling.{gguf_key}")
            if value is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise NotImplementedError(f"GGUF rope scaling type {kind!r} is not supported")


def gguf_config_dict(reader: gguf.GGUFReader) -> dict:
    """An HF ``config.json``-style dict from the GGUF metadata (and tensor list)."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; "
                         f"supported: {sorted(SUPPORTED_GGUF_ARCHITECTURES)}")
    hf_arch, model_type = SUPPORTED_GGUF_ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}

    def key(suffix: str, default: Any = None) -> Any:
        return _single(_field(reader, f"{arch}.{suffix}", default), f"{arch}.{suffix}")

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    max_pos = int(key("context_length", 2048))
    embed = tensors["token_embd.weight"]
    vocab = int(embed.shape[-1]) if len(embed.shape) == 2 else int(key("vocab_size"))

    eos = [_field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": max_pos,
        "rope_theta": float(key("rope.freq_base", 10_000.0)),
        "rope_scaling": _rope_scaling(reader, arch, max_pos),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "mlp_bias": "blk.0.ffn_gate.bias" in tensors,
    }
    rope_dims = key("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise NotImplementedError(f"partial rotary ({rope_dims} of {head_dim} dims) is not supported")
    if _ROPE_FREQS in tensors:
        config["rope_freq_factors"] = dequantize_tensor(tensors[_ROPE_FREQS]).reshape(-1).tolist()
    if arch == "gemma3":
        config.update(_gemma3_config(reader, key, config))
    experts = int(key("expert_count", 0) or 0)
    if experts:
        config.update(_moe_config(arch, key, experts))
    return config


def _moe_config(arch: str, key, experts: int) -> dict:
    """llama.cpp stores Mixtral as ``llama`` with experts; Qwen3-MoE as ``qwen3moe``."""
    used = int(key("expert_used_count", 2))
    if arch == "llama":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": experts,
                "num_experts_per_tok": used}
    if arch == "qwen3moe":
        # llama.cpp renormalises Qwen3-MoE's top-k weights unless the file says otherwise
        return {"num_experts": experts, "num_experts_per_tok": used,
                "moe_intermediate_size": int(key("expert_feed_forward_length")),
                "norm_topk_prob": bool(key("expert_weights_norm", True))}
    raise NotImplementedError(f"GGUF architecture {arch!r} with {experts} experts is not supported")


def _gemma3_config(reader: gguf.GGUFReader, key, config: dict) -> dict:
    layers = config["num_hidden_layers"]
    window = key("attention.sliding_window")
    out: dict[str, Any] = {
        "sliding_window": None if window is None else int(window),
        "final_logit_softcapping": key("final_logit_softcapping"),
        "rope_local_base_freq": float(key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_THETA)),
        "hidden_activation": "gelu_pytorch_tanh",
        # llama.cpp: 1/sqrt(head_dim), except the 27B model which uses hidden/heads
        "query_pre_attn_scalar": (
            config["hidden_size"] // config["num_attention_heads"]
            if layers == _GEMMA3_27B_LAYERS
            else config["head_dim"]
        ),
    }
    pattern = _field(reader, "gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer files: one bool per layer
        out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        out["sliding_window_pattern"] = int(pattern) if pattern is not None else _GEMMA3_SLIDING_PATTERN
    return out


def _hf_name(gguf_name: str, arch: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_NAME.match(gguf_name)
    if m is None:
        return None
    table = _GEMMA3_BLOCK_TENSORS if arch == "gemma3" else _BLOCK_TENSORS
    part = table.get(m.group(2))
    if part is None:
        return None
    return f"model.layers.{m.group(1)}.{part}.{m.group(3)}"


def is_quantized(reader: gguf.GGUFReader) -> bool:
    """Whether the file stores some tensor quantized (Q8_0, Q4_1, K-quants...), not as F32/F16/BF16."""
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}
    return any(t.tensor_type not in plain for t in reader.tensors)


def load_gguf(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    reader: gguf.GGUFReader | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, HF-named state dict dequantized to ``dtype`` on ``device``); ``reader``: the
    file already opened (parsing its metadata takes seconds for a large vocabulary)."""
    reader = reader if reader is not None else gguf.GGUFReader(str(path))
    config = gguf_config_dict(reader)
    arch = _field(reader, "general.architecture")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into the config as rope_freq_factors
        name = _hf_name(tensor.name, arch)
        if name is None:
            logger.warning("skipping unknown GGUF tensor %s", tensor.name)
            continue
        values = dequantize_tensor(tensor)
        if arch in _PERMUTED_QK_ARCHITECTURES:
            if ".attn_q." in tensor.name:
                values = unpermute_qk(values, heads)
            elif ".attn_k." in tensor.name:
                values = unpermute_qk(values, kv_heads)
        if arch in _NORM_SHIFT_ARCHITECTURES and tensor.name.endswith("norm.weight"):
            values = values - 1.0
        if not values.flags.writeable:
            values = values.copy()  # F32 tensors come back as read-only views of the mmap
        state[name] = torch.from_numpy(np.ascontiguousarray(values)).to(device=device, dtype=dtype)
    logger.info("dequantized %d tensors from %s (%s)", len(state), path, arch)
    return config, state


_Q4_TYPES = {gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1}


def _block_matrices(reader: gguf.GGUFReader, types: Collection[gguf.GGMLQuantizationType],
                    parse: Callable[[np.ndarray, str, tuple[int, int]], BlockRows],
                    names: Collection[str] | None = None) -> dict[str, BlockRows]:
    """The 2-D weight matrices stored in one of ``types``, undequantized, by HF name (only ``names``
    if given), parsed by ``parse(raw, type name, (N, K))``; llama's q/k rows un-permuted as
    :func:`load_gguf` does."""
    config = gguf_config_dict(reader)
    arch = _field(reader, "general.architecture")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, BlockRows] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in types or len(tensor.shape) != 2:
            continue
        name = _hf_name(tensor.name, arch)
        if name is None or not name.endswith(".weight") or (names is not None and name not in names):
            continue
        n, k = int(tensor.shape[1]), int(tensor.shape[0])
        rows = parse(np.asarray(tensor.data), tensor.tensor_type.name, (n, k))
        if arch in _PERMUTED_QK_ARCHITECTURES and (".attn_q." in tensor.name or ".attn_k." in tensor.name):
            rows = rows.select_rows(unpermute_qk(np.arange(n), heads if ".attn_q." in tensor.name else kv_heads))
        out[name] = rows
    return out


def read_q4_rows(reader: gguf.GGUFReader) -> dict[str, Q4Rows]:
    """The Q4_0 / Q4_1 weight matrices, undequantized, by HF name: the small-batch linears read these
    exact 4-bit blocks (``kernels.q4_pack``)."""
    return _block_matrices(reader, _Q4_TYPES, Q4Rows.from_ggml)


def read_q8_rows(reader: gguf.GGUFReader, names: Collection[str] | None = None) -> dict[str, Q8Rows]:
    """The Q8_0 weight matrices, undequantized, by HF name: the LM head reads its exact blocks
    (``kernels.q8_pack``). ``names``: only these HF names (a file of Q8_0 layers would otherwise be
    copied whole for one matrix)."""
    parse = lambda raw, _type_name, shape: Q8Rows.from_ggml(raw, shape)  # noqa: E731 (one type only)
    return _block_matrices(reader, {gguf.GGMLQuantizationType.Q8_0}, parse, names)
