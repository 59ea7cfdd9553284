"""The engine's MoE side: expert-load statistics and EPLB re-placement at step boundaries.

Expert parallelism is simulated in one process: an EP rank is a group of ``slots_per_rank``
physical expert slots with its own load counter, and its modelled time is the number of tokens
its slots served. Nothing runs in parallel and no weights cross a network; applying a placement
does copy every slot's weights (as moving them to their rank would), which is what
``last_rebalance_apply_s`` measures.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from common.engine.config import EngineConfig
from common.engine.eplb import ExpertPlacement, identity_placement, rank_loads, rebalance
from common.engine.expert_load import ExpertLoadTracker
from common.models.moe import MoeDecoderForCausalLM

logger = logging.getLogger(__name__)

__all__ = ["ExpertParallel"]

SIMULATION_NOTE = ("simulated EP ranks in one process: a rank is a group of expert slots, its modelled time "
                   "is the tokens its slots served")


class ExpertParallel:
    """Owns the expert-load tracker and the current placement of one MoE model."""

    def __init__(self, model: MoeDecoderForCausalLM, config: EngineConfig) -> None:
        blocks = model.moe_blocks()
        self.model = model
        self.num_ranks = config.ep_ranks
        self.num_redundant = config.eplb_redundant_experts
        self.interval = config.eplb_interval_steps
        self.num_experts = blocks[0].experts.num_experts
        num_slots = self.num_experts + self.num_redundant
        if num_slots % self.num_ranks:
            raise ValueError(f"{self.num_experts} experts + {self.num_redundant} redundant slots do not divide "
                             f"over ep_ranks={self.num_ranks}")
        device = blocks[0].experts.gate_up_proj.device
        self.tracker = ExpertLoadTracker(len(blocks), self.num_experts, num_slots, config.expert_load_window_steps,
                                         device)
        model.set_expert_counts_hook(self.tracker.record)
        self.placement: ExpertPlacement | None = None
        if self.num_ranks > 1 or self.num_redundant > 0:
            self._apply(identity_placement(len(blocks), self.num_experts, self.num_ranks, self.num_redundant))
        self.rebalances = 0
        self.last_compute_s = self.last_apply_s = 0.0
        self.total_rebalance_s = 0.0

    @classmethod
    def for_model(cls, model: Any, config: EngineConfig) -> ExpertParallel | None:
        """The controller for an MoE model, None for a dense one (refusing EP settings there)."""
        for name, low in (("ep_ranks", 1), ("eplb_redundant_experts", 0), ("eplb_interval_steps", 0),
                          ("expert_load_window_steps", 1)):
            if getattr(config, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(config, name)}")
        if isinstance(model, MoeDecoderForCausalLM) and model.moe_blocks():
            return cls(model, config)
        if config.ep_ranks > 1 or config.eplb_redundant_experts or config.eplb_interval_steps:
            raise ValueError("ep_ranks / eplb_redundant_experts / eplb_interval_steps need an MoE model, "
                             f"and {type(model).__name__} has no expert layers")
        return None

    def after_step(self) -> None:
        """Close the step's statistics; every ``eplb_interval_steps`` steps, re-place the experts."""
        self.tracker.end_step()
        if self.interval and self.placement is not None and self.tracker.steps % self.interval == 0:
            self.rebalance()

    def rebalance(self) -> ExpertPlacement:
        """EPLB from the window's load, applied now (the caller is between steps)."""
        t0 = time.perf_counter()
        placement = rebalance(self.tracker.expert_load(), self.num_ranks, self.num_redundant)
        t1 = time.perf_counter()
        if self.placement is None or placement.slot_to_expert != self.placement.slot_to_expert:
            self._apply(placement)
        t2 = time.perf_counter()
        self.rebalances += 1
        self.last_compute_s, self.last_apply_s = t1 - t0, t2 - t1
        self.total_rebalance_s += t2 - t0
        logger.info("EPLB re-placement %d: compute %.2f ms, apply %.2f ms", self.rebalances,
                    1e3 * self.last_compute_s, 1e3 * self.last_apply_s)
        return placement

    def _apply(self, placement: ExpertPlacement) -> None:
        self.model.set_expert_placement(placement.slot_to_expert)
        self.placement = placement
        self.tracker.placement_changed()

    def predicted_imbalance(self, placement: ExpertPlacement | None = None) -> float:
        """Modelled peak/mean rank load of the window's load under ``placement`` (default: current)."""
        placement = placement or self.placement
        if placement is None:
            return 1.0
        loads = self.tracker.expert_load()
        per_layer = [rank_loads(load, layout, self.num_ranks) for load, layout in zip(loads, placement.slot_to_expert)]
        peak = sum(max(r) for r in per_layer)
        mean = sum(sum(r) / len(r) for r in per_layer)
        return peak / mean if mean > 0 else 1.0

    def stats(self) -> dict[str, Any]:
        ranks = self.num_ranks if self.placement is not None else 1
        summary = self.tracker.summary(ranks)
        summary.update(
            ep_ranks=ranks,
            redundant_slots=self.num_redundant,
            eplb_interval_steps=self.interval,
            rebalances=self.rebalances,
            last_rebalance_compute_s=self.last_compute_s,
            last_rebalance_apply_s=self.last_apply_s,
            total_rebalance_s=self.total_rebalance_s,
            note=SIMULATION_NOTE,
        )
        return summary
