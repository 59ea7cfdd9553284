"""One normalised description of a decoder-only model, built from an HF ``config.json`` dict.

HF configs drift between model families and between transformers versions (``rope_theta`` +
``rope_scaling`` before v5, ``rope_parameters`` after; Gemma 3 nests rope settings per layer
type). :meth:`ModelConfig.from_hf_dict` reads all of those spellings so the model code sees
exactly one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ModelConfig", "ARCHITECTURE_BY_MODEL_TYPE"]

ARCHITECTURE_BY_MODEL_TYPE: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}

# Vision-language families whose language model is described by a nested ``text_config``.
_MULTIMODAL_MODEL_TYPES = ("qwen2_5_vl",)

_DEFAULT_ROPE_THETA = 10_000.0
_GEMMA3_GLOBAL_THETA = 1_000_000.0
_GEMMA3_LOCAL_THETA = 10_000.0
_GEMMA3_DEFAULT_SLIDING_PATTERN = 6
_ROPE_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    sliding_window: int | None
    layer_sliding: list[bool]
    bos_token_id: int | None
    eos_token_ids: list[int]
    attention_bias: bool  # bias on the q/k/v projections
    o_proj_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    pad_token_id: int | None = None
    # Gemma 3
    query_pre_attn_scalar: float | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    rope_local_base_freq: float | None = None  # theta of the sliding-window layers
    rope_local_scaling: dict | None = None
    # Per-frequency divisors of the inverse frequencies, as llama.cpp stores Llama 3 rope
    # scaling in GGUF files (tensor ``rope_freqs``); None everywhere else.
    rope_freq_factors: list[float] | None = None
    torch_dtype: str | None = None  # the checkpoint's own dtype, if it says
    # Mixture of experts (Qwen3-MoE, Mixtral); num_experts == 0 for dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: list[bool] | None = None  # per layer: sparse MoE block (True) or dense MLP

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0
    # Vision-language models (Qwen2.5-VL): the vision tower's HF config and the image tokens.
    vision_config: dict | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    mrope_section: list[int] | None = None  # M-RoPE: frequencies per (t, h, w) axis

    @property
    def is_multimodal(self) -> bool:
        return self.vision_config is not None

    @property
    def merge_size(self) -> int:
        """Patches per side folded into one language token (1 for text-only models)."""
        return int(self.vision_config.get("spatial_merge_size", 2)) if self.vision_config else 1

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        """Normalise an HF ``config.json`` dict (any transformers version)."""
        if d.get("model_type") in _MULTIMODAL_MODEL_TYPES:
            return _from_multimodal_dict(cls, d)
        if "text_config" in d and "hidden_size" not in d:
            raise ValueError(
                "multimodal configs (with text_config) are not supported here; "
                f"architectures={d.get('architectures')}"
            )
        model_type = d.get("model_type") or ""
        architectures = d.get("architectures") or []
        architecture = architectures[0] if architectures else ARCHITECTURE_BY_MODEL_TYPE.get(model_type, "")
        if not architecture:
            raise ValueError(f"cannot tell the architecture: model_type={model_type!r}, no architectures")
        if not model_type:
            model_type = _model_type_for(architecture)
        is_gemma3 = model_type in ("gemma3_text", "gemma3")
        if is_gemma3 and d.get("use_bidirectional_attention"):
            raise NotImplementedError("Gemma 3 with bidirectional attention is not supported")

        hidden = int(d["hidden_size"])
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)
        layers = int(d["num_hidden_layers"])
        max_pos = int(d.get("max_position_embeddings") or 2048)

        theta, scaling, local_theta, local_scaling = _parse_rope(d, is_gemma3, max_pos)
        sliding_window = _sliding_window(d, model_type)
        layer_sliding = _layer_sliding(d, model_type, layers, sliding_window)

        default_act = "gelu_pytorch_tanh" if is_gemma3 else "silu"
        hidden_act = d.get("hidden_activation") or d.get("hidden_act") or default_act
        attention_bias = bool(d.get("attention_bias", False))
        o_proj_bias = attention_bias
        if model_type == "qwen2":
            # Qwen2 always has q/k/v biases and never an o_proj bias (not a config switch).
            attention_bias, o_proj_bias = True, False
        if model_type == "mistral":
            attention_bias = o_proj_bias = False

        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = is_gemma3  # the HF default differs per family
        query_pre_attn_scalar = d.get("query_pre_attn_scalar", 256) if is_gemma3 else None
        moe = _parse_moe(d, model_type, layers)

        return cls(
            architecture=architecture,
            model_type="gemma3_text" if is_gemma3 else model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(tie),
            sliding_window=sliding_window,
            layer_sliding=layer_sliding,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_as_id_list(d.get("eos_token_id")),
            attention_bias=attention_bias,
            o_proj_bias=o_proj_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=hidden_act,
            pad_token_id=d.get("pad_token_id"),
            query_pre_attn_scalar=query_pre_attn_scalar,
            final_logit_softcapping=d.get("final_logit_softcapping"),
            attn_logit_softcapping=d.get("attn_logit_softcapping"),
            rope_local_base_freq=local_theta,
            rope_local_scaling=local_scaling,
            rope_freq_factors=d.get("rope_freq_factors"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            **moe,
        )


def _parse_moe(d: dict, model_type: str, layers: int) -> dict[str, Any]:
    """The MoE fields: which layers are sparse and how the router picks experts."""
    if model_type == "mixtral":
        experts = int(d.get("num_local_experts") or d.get("num_experts") or 8)
        # Mixtral's experts have the dense size, every layer is sparse, top-k weights always renormalised
        return dict(num_experts=experts, num_experts_per_tok=int(d.get("num_experts_per_tok", 2)),
                    moe_intermediate_size=int(d["intermediate_size"]), norm_topk_prob=True,
                    moe_layers=[True] * layers)
    if model_type == "qwen3_moe":
        experts = int(d.get("num_experts") or d.get("num_local_experts") or 0)
        step = int(d.get("decoder_sparse_step") or 1)
        dense_only = set(d.get("mlp_only_layers") or [])
        sparse = [experts > 0 and i not in dense_only and (i + 1) % step == 0 for i in range(layers)]
        return dict(num_experts=experts, num_experts_per_tok=int(d.get("num_experts_per_tok", 8)),
                    moe_intermediate_size=int(d.get("moe_intermediate_size") or d["intermediate_size"]),
                    norm_topk_prob=bool(d.get("norm_topk_prob", False)), moe_layers=sparse)
    return {}
def _from_multimodal_dict(cls: type[ModelConfig], d: dict) -> ModelConfig:
    """A VL config: its language model's settings with the vision tower's config alongside."""
    architectures = d.get("architectures") or [ARCHITECTURE_BY_MODEL_TYPE[d["model_type"]]]
    # The language model is Qwen2's (q/k/v biases, no o_proj bias).
    text = {**d.get("text_config", {}), "architectures": architectures, "model_type": "qwen2"}
    # generation_config.json's stop ids are merged at the top level (read_hf_config)
    eos = _as_id_list(text.get("eos_token_id")) + _as_id_list(d.get("eos_token_id"))
    text["eos_token_id"] = list(dict.fromkeys(eos))
    for key in ("tie_word_embeddings", "torch_dtype", "dtype"):
        if key in d and key not in text:
            text[key] = d[key]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    config = cls.from_hf_dict(text)
    config.model_type = d["model_type"]
    config.vision_config = dict(d.get("vision_config") or {})
    config.image_token_id = d.get("image_token_id")
    config.vision_start_token_id = d.get("vision_start_token_id")
    config.mrope_section = list(rope.get("mrope_section") or [16, 24, 24])
    if sum(config.mrope_section) != config.head_dim // 2:
        raise ValueError(f"mrope_section {config.mrope_section} must sum to head_dim/2 = {config.head_dim // 2}")
    return config


def _model_type_for(architecture: str) -> str:
    for model_type, arch in ARCHITECTURE_BY_MODEL_TYPE.items():
        if arch == architecture:
            return model_type
    raise ValueError(f"unknown architecture {architecture!r}")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _normalise_rope(params: dict | None, default_theta: float, max_pos: int) -> tuple[float, dict | None]:
    """(theta, scaling) from one flat rope dict; scaling is None for plain RoPE."""
    params = dict(params or {})
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", None) or default_theta)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", max_pos)
    return theta, {"rope_type": rope_type, **params}


def _parse_rope(
    d: dict, is_gemma3: bool, max_pos: int
) -> tuple[float, dict | None, float | None, dict | None]:
    """(theta, scaling) for full-attention layers, and the same for Gemma 3's local layers."""
    rope_parameters = d.get("rope_parameters")
    legacy_scaling = d.get("rope_scaling")
    legacy_theta = d.get("rope_theta")
    nested = isinstance(rope_parameters, dict) and any(k in rope_parameters for k in _ROPE_LAYER_TYPES)

    if nested:
        full = dict(rope_parameters.get("full_attention") or {})
        local = rope_parameters.get("sliding_attention")
    else:
        full = dict(rope_parameters or {})
        local = None
        if legacy_scaling:
            # transformers lets an explicit rope_scaling replace rope_parameters wholesale
            theta = full.get("rope_theta")
            full = dict(legacy_scaling)
            if theta is not None:
                full.setdefault("rope_theta", theta)
    if legacy_theta is not None:
        full.setdefault("rope_theta", legacy_theta)

    if not is_gemma3:
        theta, scaling = _normalise_rope(full, _DEFAULT_ROPE_THETA, max_pos)
        return theta, scaling, None, None

    if nested and legacy_scaling:
        full.update(legacy_scaling)  # Gemma 3 applies an old-style rope_scaling to global layers
    theta, scaling = _normalise_rope(full, _GEMMA3_GLOBAL_THETA, max_pos)
    local = dict(local or {})
    if d.get("rope_local_base_freq") is not None:
        local.setdefault("rope_theta", d["rope_local_base_freq"])
    local_theta, local_scaling = _normalise_rope(local, _GEMMA3_LOCAL_THETA, max_pos)
    return theta, scaling, local_theta, local_scaling


def _sliding_window(d: dict, model_type: str) -> int | None:
    window = d.get("sliding_window")
    if window is None or model_type == "llama":
        return None  # HF Llama ignores any sliding_window key
    if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
        return None
    return int(window)


def _layer_sliding(d: dict, model_type: str, layers: int, window: int | None) -> list[bool]:
    if window is None:
        return [False] * layers
    if model_type in ("mistral", "mixtral", "qwen3_moe"):
        return [True] * layers  # HF applies these models' window to every layer
    layer_types = d.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:
        return [t == "sliding_attention" for t in layer_types]
    if model_type in ("gemma3_text", "gemma3"):
        pattern = int(d.get("sliding_window_pattern") or _GEMMA3_DEFAULT_SLIDING_PATTERN)
        return [bool((i + 1) % pattern) for i in range(layers)]
    if model_type in ("qwen2", "qwen3"):
        first = int(d.get("max_window_layers", 0))
        return [i >= first for i in range(layers)]
    logger.warning("sliding_window=%s for model_type %r with no layer_types: applying to all layers",
                   window, model_type)
    return [True] * layers
