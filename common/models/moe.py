"""Sparse mixture-of-experts block: a softmax top-k router and grouped expert GEMMs.

The flat token batch ``[T, hidden]`` is routed (each token to ``top_k`` experts), the
``T * top_k`` (token, expert) assignments are sorted by the expert slot that serves them, and each
slot that got tokens runs one fused gate/up GEMM and one down GEMM over its contiguous rows; the
weighted rows go back to their tokens with one ``index_add_``. The number of Python-level calls is
bounded by the number of expert slots, never by the number of tokens.

Expert slots: by default slot ``e`` is logical expert ``e``. An expert-parallel placement
(:meth:`GroupedExperts.set_placement`, computed by :mod:`common.engine.eplb`) maps physical slots
to logical experts, with redundant replicas of hot experts; the assignments of a logical expert are
split evenly (round-robin in sorted order) among its replicas. Replicas hold copies of the same
weights, so outputs do not depend on the placement — only which slot does the work does.

:class:`MoeDecoderForCausalLM` is what every MoE family (Qwen3-MoE, Mixtral) shares: its spec's
``mlp_factory`` (:func:`moe_mlp_factory`), the expert-count hook and the placement of all layers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.models.config import ModelConfig
from common.models.layers import DecoderForCausalLM, GatedMLP
from kernels.activation import act_and_mul

__all__ = ["ExpertRouter", "GroupedExperts", "SparseMoeBlock", "fuse_expert_tensors", "ExpertCountsHook",
           "MoeDecoderForCausalLM", "moe_mlp_factory"]

# (moe layer index, tokens per logical expert [E], tokens per physical slot [P]) -> None
ExpertCountsHook = Callable[[int, torch.Tensor, torch.Tensor], None]

# Per-expert HF tensors: Qwen3-MoE ``mlp.experts.E.{gate,up,down}_proj``, Mixtral
# ``block_sparse_moe.experts.E.{w1,w3,w2}`` (w1 = gate, w3 = up, w2 = down).
_PER_EXPERT = re.compile(
    r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PART = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_MIXTRAL_BLOCK = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.")
# Already stacked per layer ([E, out, in]), as GGUF's ffn_{gate,up,down}_exps come
_STACKED = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_expert_tensors(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Stack per-expert HF matrices into ``mlp.experts.gate_up_proj [E, 2I, H]`` and
    ``mlp.experts.down_proj [E, H, I]`` (gate rows before up rows, as the dense fused MLP);
    Mixtral's ``block_sparse_moe`` is renamed ``mlp``. Other tensors pass through. Consumes ``state``."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    stacked: dict[str, dict[str, torch.Tensor]] = {}
    for name in list(state):
        tensor = state.pop(name)
        if (m := _STACKED.match(name)) is not None:
            stacked.setdefault(m.group(1), {})[_PART[m.group(2)]] = tensor
            continue
        m = _PER_EXPERT.match(name)
        if m is None:
            out[_MIXTRAL_BLOCK.sub(r"\1.mlp.", name)] = tensor
            continue
        layer, index, part = m.group(1), int(m.group(2)), _PART[m.group(3)]
        if index >= num_experts:
            raise ValueError(f"{name}: expert {index} but the config says {num_experts} experts")
        experts.setdefault(layer, {})[(index, part)] = tensor
    for layer, parts in experts.items():
        missing = [f"{e}.{p}" for e in range(num_experts) for p in ("gate", "up", "down") if (e, p) not in parts]
        if missing:
            raise ValueError(f"{layer}: incomplete expert tensors, missing {missing[:6]}")
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]], dim=0) for e in range(num_experts)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([parts[(e, "down")] for e in range(num_experts)])
    for layer, parts in stacked.items():
        if sorted(parts) != ["down", "gate", "up"] or any(t.shape[0] != num_experts for t in parts.values()):
            raise ValueError(f"{layer}: stacked expert tensors {sorted(parts)} do not hold {num_experts} experts")
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.cat([parts["gate"], parts["up"]], dim=1)
        out[f"{layer}.mlp.experts.down_proj"] = parts["down"]
    return out


class ExpertRouter(nn.Module):
    """Softmax over expert logits, top-k, optionally renormalised over the chosen k.

    A bare weight (not ``nn.Linear``) so bf16 prepacking and int8 paths never touch it: the
    routing decision is the one place where a small numeric change flips a discrete choice.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [T, k] in x.dtype, expert ids [T, k])``."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids


class GroupedExperts(nn.Module):
    """All experts of one layer as two stacked weights, run slot by slot over sorted tokens."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act_and_mul = act_and_mul(hidden_act)
        # Physical slots (None: slot e = expert e). Plain attributes: not part of the state dict.
        self._slot_gate_up: torch.Tensor | None = None
        self._slot_down: torch.Tensor | None = None
        self._replica_slots: torch.Tensor | None = None  # [E, max replicas] physical slot ids
        self._num_replicas: torch.Tensor | None = None  # [E]

    @property
    def num_slots(self) -> int:
        return self.num_experts if self._slot_gate_up is None else self._slot_gate_up.shape[0]

    def set_placement(self, slot_to_expert: list[int] | None) -> None:
        """Lay the experts out on physical slots (``slot_to_expert[s]`` = logical expert of slot s;
        None = one slot per expert). Copies the weights of every slot, as moving them to their
        rank would; called between steps."""
        if slot_to_expert is None:
            self._slot_gate_up = self._slot_down = self._replica_slots = self._num_replicas = None
            return
        if sorted(set(slot_to_expert)) != list(range(self.num_experts)):
            raise ValueError(f"a placement must hold every one of the {self.num_experts} experts at least once")
        device = self.gate_up_proj.device
        index = torch.tensor(slot_to_expert, dtype=torch.long, device=device)
        replicas: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(slot_to_expert):
            replicas[expert].append(slot)
        width = max(len(r) for r in replicas)
        table = torch.tensor([r + [r[0]] * (width - len(r)) for r in replicas], dtype=torch.long, device=device)
        self._slot_gate_up = self.gate_up_proj.detach().index_select(0, index)
        self._slot_down = self.down_proj.detach().index_select(0, index)
        self._replica_slots = table
        self._num_replicas = torch.tensor([len(r) for r in replicas], dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                on_counts: ExpertCountsHook | None = None, layer: int = 0) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.zeros_like(x)
        top_k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert_counts = torch.bincount(flat, minlength=self.num_experts)
        if self._replica_slots is None:
            slots, slot_counts = flat[order], expert_counts
            gate_up, down = self.gate_up_proj, self.down_proj
        else:
            order, slots, slot_counts = self._spread_over_replicas(flat, order, expert_counts)
            gate_up, down = self._slot_gate_up, self._slot_down
        if on_counts is not None:
            on_counts(layer, expert_counts, slot_counts)
        token_rows = order // top_k
        rows = x.index_select(0, token_rows)
        outs = []
        start = 0
        # One host read of the slot sizes to cut the sorted rows; then one GEMM pair per busy slot.
        for slot, count in enumerate(slot_counts.tolist()):
            if count:
                seg = rows[start:start + count]
                outs.append(F.linear(self.act_and_mul(F.linear(seg, gate_up[slot])), down[slot]))
                start += count
        y = torch.cat(outs) * weights.reshape(-1).index_select(0, order).unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token_rows, y.to(x.dtype))

    def _spread_over_replicas(self, flat: torch.Tensor, order: torch.Tensor,
                              expert_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The i-th assignment (in sorted order) of expert e goes to replica ``i mod replicas(e)``;
        returns the assignments re-sorted by physical slot, their slots and the slot sizes."""
        sorted_experts = flat.index_select(0, order)
        starts = torch.cumsum(expert_counts, 0) - expert_counts
        position = torch.arange(flat.numel(), device=flat.device) - starts.index_select(0, sorted_experts)
        replica = position % self._num_replicas.index_select(0, sorted_experts)
        slots = self._replica_slots[sorted_experts, replica]
        by_slot = torch.argsort(slots, stable=True)
        slots = slots.index_select(0, by_slot)
        return order.index_select(0, by_slot), slots, torch.bincount(slots, minlength=self.num_slots)


class SparseMoeBlock(nn.Module):
    """The MoE replacement of the dense gated MLP (HF module ``mlp``: ``gate`` + ``experts``)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 hidden_act: str, norm_topk_prob: bool, moe_index: int) -> None:
        super().__init__()
        self.gate = ExpertRouter(hidden_size, num_experts, top_k, norm_topk_prob)
        self.experts = GroupedExperts(num_experts, hidden_size, intermediate_size, hidden_act)
        self.moe_index = moe_index  # position among the model's MoE layers (statistics rows)
        self.on_counts: ExpertCountsHook | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids, self.on_counts, self.moe_index)


def moe_mlp_factory(config: ModelConfig, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s feed-forward block: sparse where ``config.moe_layers`` says so."""
    sparse = config.moe_layers or [False] * config.num_hidden_layers
    if not sparse[layer_idx]:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                          config.moe_intermediate_size, config.hidden_act, config.norm_topk_prob,
                          moe_index=sum(sparse[:layer_idx]))


class MoeDecoderForCausalLM(DecoderForCausalLM):
    """A decoder whose spec builds its feed-forward blocks with :func:`moe_mlp_factory`."""

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def set_expert_counts_hook(self, hook: ExpertCountsHook | None) -> None:
        """Called by every MoE block with its per-expert and per-slot token counts (device tensors)."""
        for block in self.moe_blocks():
            block.on_counts = hook

    def set_expert_placement(self, slot_to_expert: list[list[int]] | None) -> None:
        """One physical-slot layout per MoE layer (None: one slot per expert everywhere)."""
        blocks = self.moe_blocks()
        if slot_to_expert is not None and len(slot_to_expert) != len(blocks):
            raise ValueError(f"placement has {len(slot_to_expert)} layers, the model {len(blocks)} MoE layers")
        for i, block in enumerate(blocks):
            block.experts.set_placement(None if slot_to_expert is None else slot_to_expert[i])
