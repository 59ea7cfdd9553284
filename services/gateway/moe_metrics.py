"""Prometheus gauges of MoE workers, from the ``expert_load`` summary in their heartbeat stats.

Label cardinality stays at (instance x expert) and (instance x rank): tokens per expert are
summed over layers here; the per-layer table is in ``/status`` (each instance's
``stats.expert_load.tokens_per_expert``).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from services.gateway.metric_values import as_number, remove_series

__all__ = ["MoeMetrics"]


class MoeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.expert_tokens = Gauge(
            "xllm_moe_expert_tokens", "Tokens routed to a logical expert over the worker's recent window of "
            "steps, summed over MoE layers", ["instance", "expert"], registry=registry)
        self.rank_tokens = Gauge(
            "xllm_moe_rank_tokens", "Tokens a simulated EP rank's expert slots served over the window, summed "
            "over MoE layers (a rank's modelled time is its token load)", ["instance", "rank"], registry=registry)
        self.rank_imbalance = Gauge(
            "xllm_moe_rank_load_imbalance", "Sum over MoE layers of the busiest simulated EP rank's tokens over "
            "the sum of the mean rank's (1 = balanced)", ["instance"], registry=registry)
        self.rebalances = Gauge("xllm_moe_eplb_rebalances", "EPLB re-placements a worker applied",
                                ["instance"], registry=registry)
        self.rebalance_seconds = Gauge(
            "xllm_moe_eplb_last_rebalance_seconds", "Time of a worker's last EPLB re-placement (compute + apply)",
            ["instance"], registry=registry)
        self._labels: dict[str, tuple[int, int]] = {}  # instance -> (experts, ranks) it has series for

    def update(self, instance: str, stats: dict[str, Any]) -> None:
        load = stats.get("expert_load")
        if not isinstance(load, dict):
            self.forget(instance)
            return
        per_layer = load.get("tokens_per_expert") or []
        totals = [sum(col) for col in zip(*per_layer)] if per_layer else []
        ranks = load.get("rank_tokens") or []
        previous = self._labels.get(instance)
        if previous is not None and previous != (len(totals), len(ranks)):
            self.forget(instance)
        for expert, tokens in enumerate(totals):
            self.expert_tokens.labels(instance, str(expert)).set(tokens)
        for rank, tokens in enumerate(ranks):
            self.rank_tokens.labels(instance, str(rank)).set(tokens)
        self.rank_imbalance.labels(instance).set(as_number(load.get("rank_load_imbalance"), 1.0))
        self.rebalances.labels(instance).set(as_number(load.get("rebalances")))
        self.rebalance_seconds.labels(instance).set(
            as_number(load.get("last_rebalance_compute_s")) + as_number(load.get("last_rebalance_apply_s")))
        self._labels[instance] = (len(totals), len(ranks))

    def forget(self, instance: str) -> None:
        experts, ranks = self._labels.pop(instance, (0, 0))
        for expert in range(experts):
            remove_series(self.expert_tokens, instance, str(expert))
        for rank in range(ranks):
            remove_series(self.rank_tokens, instance, str(rank))
        for gauge in (self.rank_imbalance, self.rebalances, self.rebalance_seconds):
            remove_series(gauge, instance)


