"""Rotary position embeddings: inverse frequencies per scaling type and cos/sin tables."""

from __future__ import annotations

import math

import torch

__all__ = ["RotaryEmbedding", "MRotaryEmbedding", "rope_inverse_frequencies"]

_INITIAL_ROPE_POSITIONS = 4096


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: dict | None = None,
    freq_factors: list[float] | None = None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim/2]`` (float32, CPU) and the cos/sin scale.

    Follows transformers' ``ROPE_INIT_FUNCTIONS`` for default / linear / llama3 / yarn.
    ``freq_factors`` divides each frequency (llama.cpp's ``rope_freqs`` tensor).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    attention_scaling = 1.0
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_inverse_frequencies(inv_freq, scaling)
    elif rope_type == "yarn":
        inv_freq, attention_scaling = _yarn_inverse_frequencies(head_dim, theta, scaling)
    else:
        raise NotImplementedError(f"rope scaling type {rope_type!r} is not supported")
    if freq_factors is not None:
        factors = torch.tensor(freq_factors, dtype=torch.float32, device="cpu")
        if factors.numel() != inv_freq.numel():
            raise ValueError(f"rope_freq_factors has {factors.numel()} values, expected {inv_freq.numel()}")
        inv_freq = inv_freq / factors
    return inv_freq, attention_scaling


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original_max = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """Precomputed cos/sin rows looked up by absolute position.

    The table holds ``[cos | sin]`` (each ``head_dim/2`` wide) per position, in float32 and in
    the activation dtype; it is built on first use on the positions' device and grows by
    doubling when a longer position shows up, so short-context serving never pays for the
    model's full ``max_position_embeddings``.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None,
                 freq_factors: list[float] | None = None) -> None:
        self.head_dim = head_dim
        self.inv_freq, self.attention_scaling = rope_inverse_frequencies(head_dim, theta, scaling, freq_factors)
        self._table: torch.Tensor | None = None  # float32 [L, head_dim]
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        self._fixed = False  # set by reserve(): no per-call length check (no host sync)

    def _build(self, length: int, device: torch.device) -> None:
        positions = torch.arange(length, dtype=torch.float32, device=device)
        freqs = positions[:, None] * self.inv_freq.to(device)[None, :]
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        if self.attention_scaling != 1.0:
            table = table * self.attention_scaling
        self._table = table
        self._cast = {torch.float32: table}

    def reserve(self, num_positions: int, device: torch.device | str, dtype: torch.dtype) -> None:
        """Build the table for positions ``< num_positions`` now and stop checking lengths.

        Lookups then never read ``positions`` back to the host, which CUDA-graph capture needs;
        a position past the reserved range becomes an indexing error.
        """
        self._build(num_positions, torch.device(device))
        self._cast[dtype] = self._table.to(dtype)
        self._fixed = True

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, head_dim/2]`` in ``dtype`` for ``positions [T]``."""
        if not self._fixed:
            needed = int(positions.max()) + 1 if positions.numel() else 1
            table = self._table
            if table is None or table.shape[0] < needed or table.device != positions.device:
                current = 0 if table is None else table.shape[0]
                self._build(max(needed, 2 * current, _INITIAL_ROPE_POSITIONS), positions.device)
        cast = self._cast.get(dtype)
        if cast is None:
            cast = self._cast[dtype] = self._table.to(dtype)
        rows = cast.index_select(0, positions)
        half = self.head_dim // 2
        return rows[:, :half], rows[:, half:]


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL): positions ``[3, T]`` (temporal, height, width); frequency band
    ``i`` of ``sections`` is rotated by axis ``i % 3``'s position. Plain ``[T]`` positions (text
    only) take the base lookup: with equal positions on the three axes both are the same."""

    def __init__(self, head_dim: int, theta: float, sections: list[int], scaling: dict | None = None) -> None:
        super().__init__(head_dim, theta, scaling)
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope sections {sections} must sum to head_dim/2 = {head_dim // 2}")
        self.sections = list(sections)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().lookup(positions, dtype)
        axes = [super(MRotaryEmbedding, self).lookup(positions[a], dtype) for a in range(3)]
        cos_parts, sin_parts = [], []
        start = 0
        for band, width in enumerate(self.sections):
            cos, sin = axes[band % 3]
            cos_parts.append(cos[:, start : start + width])
            sin_parts.append(sin[:, start : start + width])
            start += width
        return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)
