"""Qwen2.5-VL's vision tower: patch embedding, ViT blocks with window attention, patch merger.

Input is what transformers' Qwen2-VL image processor returns: ``pixel_values [patches, C*T*P*P]``
with patches already ordered in ``merge x merge`` blocks, plus each image's ``grid_thw`` (in
patches). Most blocks attend inside windows of ``window_size`` pixels (tokens are permuted so
each window is contiguous); the ``fullatt_block_indexes`` blocks attend over the whole image.
The merger folds each ``merge x merge`` block into one language-model token. Weight names
follow the HF checkpoint (``visual.*``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.activation import act_and_mul

__all__ = ["VisionTransformer", "window_partition"]


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class _PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over one patch each: a single matmul."""

    def __init__(self, in_channels: int, temporal_patch: int, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(temporal_patch, patch, patch),
                              stride=(temporal_patch, patch, patch), bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)
        # rotary in float32 as the reference does, then back
        qf, kf = q.float(), k.float()
        q = (qf * cos + _rotate_half(qf) * sin).to(x.dtype)
        k = (kf * cos + _rotate_half(kf) * sin).to(x.dtype)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1], bounds[1:]):
            out[:, start:end] = F.scaled_dot_product_attention(q[:, start:end], k[:, start:end], v[:, start:end])
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act_and_mul = act_and_mul(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)))


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.norm1 = _RMSNorm(dim)
        self.norm2 = _RMSNorm(dim)
        self.attn = _Attention(dim, num_heads)
        self.mlp = _MLP(dim, intermediate, act)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.mlp(self.norm2(x))


class _Merger(nn.Module):
    def __init__(self, out_dim: int, context_dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = context_dim * merge**2
        self.ln_q = _RMSNorm(context_dim)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def window_partition(grids: list[tuple[int, int, int]], merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """(order, bounds): merged-token order that makes each ``window x window`` (merged units) window
    contiguous, image after image, and the window boundaries in patch rows (each merged token is
    ``merge**2`` patches). Windows at the right/bottom edge are partial."""
    order: list[torch.Tensor] = []
    bounds = [0]
    base = 0
    unit = merge * merge
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        for ti in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    cell = index[ti, r : r + window, c : c + window].reshape(-1)
                    order.append(cell + base)
                    bounds.append(bounds[-1] + cell.numel() * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


def _image_bounds(grids: list[tuple[int, int, int]]) -> list[int]:
    """Full-attention boundaries in patch rows: one segment per frame of each image."""
    bounds = [0]
    for t, h, w in grids:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


class VisionTransformer(nn.Module):
    """``visual.*`` of a Qwen2.5-VL checkpoint; built from the HF ``vision_config`` dict."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
        self.merge = int(cfg.get("spatial_merge_size", 2))
        self.patch = int(cfg.get("patch_size", 14))
        self.window = int(cfg.get("window_size", 112)) // self.merge // self.patch
        self.full_blocks = set(cfg.get("fullatt_block_indexes", ()))
        self.patch_embed = _PatchEmbed(int(cfg.get("in_channels", 3)), int(cfg.get("temporal_patch_size", 2)),
                                       self.patch, dim)
        self.blocks = nn.ModuleList(
            _Block(dim, heads, int(cfg["intermediate_size"]), cfg.get("hidden_act", "silu"))
            for _ in range(int(cfg["depth"]))
        )
        self.merger = _Merger(int(cfg["out_hidden_size"]), dim, self.merge)
        head_dim = dim // heads
        theta = float((cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0)))
        quarter = head_dim // 2
        # a plain CPU tensor, not a buffer: the model is built on the meta device before loading
        self.inv_freq = 1.0 / theta ** (torch.arange(0, quarter, 2, dtype=torch.float, device="cpu") / quarter)
        self.out_dim = int(cfg["out_hidden_size"])

    def _rotary(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[patches, 1, head_dim]`` from each patch's (row, col), in the processor's block order."""
        rows = []
        m = self.merge
        for t, h, w in grids:
            hpos = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
            wpos = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
            rows.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        pos = torch.cat(rows).to(device)
        freqs = pos[..., None].float() * self.inv_freq.to(device)  # [n, 2, quarter/2]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos(), emb.sin()

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """``[merged tokens of all images, out_dim]`` in image order."""
        unit = self.merge**2
        x = self.patch_embed(pixel_values)
        n = x.shape[0]
        order, window_bounds = window_partition(grids, self.merge, self.window)
        order = order.to(x.device)
        full_bounds = _image_bounds(grids)

        def permute(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n // unit, unit, *t.shape[1:])[order].reshape(n, *t.shape[1:])

        x = permute(x)
        cos, sin = self._rotary(grids, x.device)
        cos, sin = permute(cos), permute(sin)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_bounds if i in self.full_blocks else window_bounds)
        merged = self.merger(x)
        return merged[torch.argsort(order)]

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One ``[t*h*w / merge**2, out_dim]`` tensor per image."""
        grids = [tuple(int(v) for v in g) for g in grid_thw]
        merged = self(pixel_values, grids)
        return list(torch.split(merged, [t * h * w // self.merge**2 for t, h, w in grids]))
