"""Engine settings: one flat dataclass; its fields are the engine flags (`common.settings`) and the
keyword arguments of `LLM(...)`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from common.settings import SettingsParser, from_namespace, setting
from kernels.linear import packed_linear_supported

SPECULATIVE_METHODS = ("none", "ngram", "suffix")
OVERLAP_MODES = ("auto", "on", "off")
# The fused projections of the decoder layers (common/models/layers.py), by module name.
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

# Measured (README, "Overlap scheduling"): on a CPU with a core to spare, planning beside the
# forward pass paid at 64 rows and not at 1, 16 or 32.
DEFAULT_OVERLAP_MIN_BATCH = 64

__all__ = ["EngineConfig", "add_engine_arguments", "engine_config_from_args", "parse_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclass
class EngineConfig:
    """Engine settings: `xllm generate`, the workers' engine flags and `LLM(**kwargs)` all use these."""

    model: str | None = setting(None, "GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    # "auto" picks the fastest correct dtype for the device (see resolved_dtype).
    dtype: str = setting("auto", "weights/activations: auto | float32 | bfloat16 | float16")
    kv_dtype: str = setting("auto", "KV page dtype: auto (= --dtype) | int8 (per-token, per-head scales, half "
                                    "the bytes of bf16) | bfloat16 | float32 | float16", flag="--kv-cache-dtype")
    page_size: int = setting(16, "tokens per KV page")
    kv_cache_memory: str | int | None = setting(
        None, "KV pool size in bytes or e.g. 2GiB (default: a fraction of free memory)")
    kv_cache_fraction: float = setting(0.2, "fraction of free memory for KV pages")
    max_num_seqs: int = setting(64, "max sequences in one batch")
    max_num_batched_tokens: int = setting(512, "token budget of one step")
    max_model_len: int | None = setting(None, "context window (default: the model's)")
    enable_prefix_cache: bool = setting(True, "do not share full KV pages between sequences with a common "
                                        "prefix", flag="--no-prefix-cache")
    device: str = setting("cpu", "torch device: cpu, cuda, cuda:N")
    cuda_graphs: bool = setting(True, "on CUDA, do not replay decode steps from CUDA graphs captured per batch "
                                      "size (common/engine/cuda_graphs.py)", flag="--no-cuda-graphs")
    num_threads: int | None = setting(None, "torch intra-op threads (default: torch's own; `xllm serve` "
                                         "splits the CPUs among its workers)", flag="--threads")
    w8a8_prompts: bool = setting(False, "run prompt tokens on the W8A8 int8 GEMMs too (faster prefill; their KV "
                                        "drifts further from fp32: see xllm bench fidelity)")
    prompt_w8a8_layers: str = setting("gate_up_proj", "comma-separated projections whose prompt tokens "
                                      "still run the W8A8 int8 GEMM without --w8a8-prompts (those whose inputs "
                                      "quantize per row at little cost: kernels/linear.py; '' = none)")
    # A restarted worker reads its packed weights and calibrated int8 scales back (common.weights.cache).
    weight_cache: bool = setting(True, "do not keep dequantized/prepacked weights and calibrated int8 scales "
                                       "on disk for the next start", flag="--no-weight-cache")
    weight_cache_dir: str | None = setting(
        None, "directory of the weight cache (default: weights/ under $XLLM_CACHE_DIR, $XDG_CACHE_HOME/xllm or "
              "~/.cache/xllm; "
              "an empty value disables it)")
    # MoE models only (see common.engine.expert_parallel): EP ranks are simulated in this process.
    ep_ranks: int = setting(1, "simulated expert-parallel ranks of an MoE model (one process; a rank's modelled "
                               "time is its token load)")
    eplb_redundant_experts: int = setting(0, "extra expert slots EPLB fills with replicas of hot experts")
    eplb_interval_steps: int = setting(0, "re-place experts (EPLB) every N engine steps from the measured "
                                          "load; 0 = never")
    expert_load_window_steps: int = setting(128, "engine steps the expert-load statistics cover")
    # Draft-free speculative decoding (common.engine.speculative): drafts come from the text itself.
    speculative_method: str = setting("none", "draft proposer: none | ngram (prompt lookup) | suffix (suffix tree "
                                              "over the prompt and outputs)", choices=SPECULATIVE_METHODS)
    # 3: a single stream's verify step is then 4 rows, still on the weight-only int8 small-batch
    # GEMMs (kernels.linear.DEFAULT_INT8_MAX_ROWS); a fifth row switches to W8A8.
    num_speculative_tokens: int = setting(3, "most draft tokens verified per decode step")
    ngram_min: int = setting(2, "shortest n-gram the ngram proposer matches")
    ngram_max: int = setting(5, "longest n-gram the ngram proposer matches")
    suffix_max_depth: int = setting(24, "depth of the suffix trees (longest pattern + draft, in tokens)")
    suffix_global: bool = setting(True, "do not let the suffix proposer also match recent outputs of other "
                                        "requests", flag="--no-suffix-global")
    suffix_global_requests: int = setting(256, "finished requests whose outputs the global suffix tree keeps")
    suffix_min_prob: float = setting(0.1, "suffix drafts stop where the estimated probability of the run "
                                          "falls below this")
    # Plan and lay out step N+1 while step N computes (common.engine.overlap). auto: on for a GPU
    # engine, off for a CPU one, where it only pays with a core left to the planning thread.
    overlap_schedule: str = setting("auto", "plan the next step while this one computes: auto (GPU on, CPU off) | "
                                            "on | off", choices=OVERLAP_MODES)
    overlap_min_batch: int = setting(DEFAULT_OVERLAP_MIN_BATCH, "with --overlap-schedule on: the smallest batch "
                                     "(rows of a step) that plans the next step beside its forward pass")

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            # bf16 halves the bytes each decode step streams; only worth it where oneDNN runs
            # prepacked bf16 GEMMs natively (AVX512-BF16/AMX), else fp32 is as fast and exact.
            if self.device == "cpu" and packed_linear_supported(torch.bfloat16):
                return torch.bfloat16
            if torch.device(self.device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
                return torch.bfloat16  # the Triton kernels' dtype; decode reads half fp32's bytes
            return torch.float32
        return parse_dtype(self.dtype)

    def prompt_w8a8_set(self) -> frozenset[str]:
        """``prompt_w8a8_layers`` as a set of projection names (ValueError for one no model has)."""
        names = frozenset(n.strip() for n in self.prompt_w8a8_layers.split(",") if n.strip())
        unknown = sorted(names - set(PROJECTIONS))
        if unknown:
            raise ValueError(f"prompt_w8a8_layers: unknown projection(s) {unknown}; choose from {list(PROJECTIONS)}")
        return names

    def resolved_weight_cache_dir(self) -> str | None:
        """Where the weight cache lives, or None when it is off."""
        if not self.weight_cache or self.weight_cache_dir == "":
            return None
        if self.weight_cache_dir is None:
            from common.weights.cache import default_cache_dir

            return str(default_cache_dir())
        return self.weight_cache_dir

    def validate_speculative(self) -> None:
        """Raise ValueError naming the first impossible speculative setting."""
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {list(SPECULATIVE_METHODS)}, "
                             f"got {self.speculative_method!r}")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError(f"num_speculative_tokens must be in [1, 32], got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.suffix_max_depth < 2:
            raise ValueError(f"suffix_max_depth must be >= 2, got {self.suffix_max_depth}")
        if self.suffix_global_requests < 1:
            raise ValueError(f"suffix_global_requests must be >= 1, got {self.suffix_global_requests}")
        if not 0.0 <= self.suffix_min_prob < 1.0:
            raise ValueError(f"suffix_min_prob must be in [0, 1), got {self.suffix_min_prob}")

    def resolved_kv_dtype(self) -> torch.dtype:
        if self.kv_dtype == "auto":
            return self.resolved_dtype()
        if self.kv_dtype.lower() == "int8":
            return torch.int8
        try:
            return parse_dtype(self.kv_dtype)
        except ValueError:
            raise ValueError(f"unknown KV cache dtype {self.kv_dtype!r}; choose auto, int8 or one of "
                             f"{sorted(_DTYPES)}") from None


def add_engine_arguments(parser: SettingsParser) -> None:
    """The engine flags, generated from `EngineConfig` (the CLI and the workers both take them)."""
    parser.add_settings(EngineConfig, "engine")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return from_namespace(EngineConfig, args)
