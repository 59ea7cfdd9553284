"""Tokens per expert per MoE layer over a sliding window of recent engine steps.

Every MoE block reports its step's counts (one ``bincount`` it computes anyway to cut the sorted
tokens) through :meth:`ExpertLoadTracker.record`: device tensors are added to this step's row,
no host sync. :meth:`end_step` moves the row into a ring of the last ``window_steps`` steps.
Only :meth:`summary` (heartbeats, benches) reads the numbers back to the host.

Two views are kept: per logical expert (what EPLB balances, independent of the placement) and
per physical slot (what each simulated rank actually served under the current placement; reset
when the placement changes, so it never mixes two layouts).
"""

from __future__ import annotations

import torch

__all__ = ["ExpertLoadTracker"]


class ExpertLoadTracker:
    def __init__(self, num_layers: int, num_experts: int, num_slots: int, window_steps: int,
                 device: torch.device | str = "cpu") -> None:
        if window_steps <= 0:
            raise ValueError(f"expert load window must be at least 1 step, got {window_steps}")
        self.num_layers, self.num_experts, self.num_slots = num_layers, num_experts, num_slots
        self.window_steps = window_steps
        self._experts = torch.zeros(window_steps, num_layers, num_experts, dtype=torch.long, device=device)
        self._slots = torch.zeros(window_steps, num_layers, num_slots, dtype=torch.long, device=device)
        self._step_experts = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)
        self._step_slots = torch.zeros(num_layers, num_slots, dtype=torch.long, device=device)
        self.steps = 0  # steps recorded since start
        self._slot_steps = 0  # steps recorded since the placement last changed

    def record(self, layer: int, expert_counts: torch.Tensor, slot_counts: torch.Tensor) -> None:
        """The hook every MoE block calls (see ``MoeDecoderForCausalLM.set_expert_counts_hook``)."""
        self._step_experts[layer] += expert_counts
        self._step_slots[layer] += slot_counts

    def end_step(self) -> None:
        row = self.steps % self.window_steps
        self._experts[row].copy_(self._step_experts)
        self._slots[row].copy_(self._step_slots)
        self._step_experts.zero_()
        self._step_slots.zero_()
        self.steps += 1
        self._slot_steps += 1

    def placement_changed(self) -> None:
        """Forget the per-slot window: its slots meant other experts."""
        self._slots.zero_()
        self._step_slots.zero_()
        self._slot_steps = 0

    def expert_load(self) -> list[list[float]]:
        """Tokens per logical expert per layer over the window (the input of EPLB)."""
        return self._experts.sum(0).double().tolist()

    def summary(self, num_ranks: int) -> dict:
        """Per-layer tokens per expert, and per simulated rank the tokens its slots served.

        A rank's modelled time is its token load; since every MoE layer waits for its slowest
        rank, the modelled step cost is the sum over layers of the per-layer peak, and
        ``rank_load_imbalance`` = that sum over the sum of per-layer means (1.0 = balanced).
        """
        experts = self._experts.sum(0)
        ranks = self._slots.sum(0).view(self.num_layers, num_ranks, self.num_slots // num_ranks).sum(-1)
        peak = float(ranks.max(-1).values.sum()) if self.num_layers else 0.0
        mean = float(ranks.double().mean(-1).sum()) if self.num_layers else 0.0
        return {
            "window_steps": self.window_steps,
            "steps_in_window": min(self.steps, self.window_steps),
            "steps_under_placement": min(self._slot_steps, self.window_steps),
            "num_moe_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "tokens_per_expert": experts.tolist(),
            "rank_tokens": ranks.sum(0).tolist(),
            "rank_load_peak": peak,
            "rank_load_mean": mean,
            "rank_load_imbalance": peak / mean if mean > 0 else 1.0,
        }
