"""Engine settings: one flat dataclass, filled from flags or keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.linear import packed_linear_supported

__all__ = ["EngineConfig", "parse_dtype"]

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
    model: str | None = None  # GGUF file or HF directory; None = the default model
    dtype: str = "auto"  # weights/activations; "auto" picks the fastest correct one for the device
    kv_dtype: str = "auto"  # KV pages; "auto" = same as dtype
    page_size: int = 16
    kv_cache_memory: str | int | None = None  # bytes or "2GiB"; None = a fraction of free memory
    kv_cache_fraction: float = 0.2
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None = the model's context window
    enable_prefix_cache: bool = True
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; None = leave torch's default

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            # bf16 halves the bytes each decode step streams; only worth it where oneDNN runs
            # prepacked bf16 GEMMs natively (AVX512-BF16/AMX), else fp32 is as fast and exact.
            if self.device == "cpu" and packed_linear_supported(torch.bfloat16):
                return torch.bfloat16
            return torch.float32
        return parse_dtype(self.dtype)

    def resolved_kv_dtype(self) -> torch.dtype:
        if self.kv_dtype == "auto":
            return self.resolved_dtype()
        return parse_dtype(self.kv_dtype)
