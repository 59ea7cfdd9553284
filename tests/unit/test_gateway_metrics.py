"""The gateway's Prometheus gauges fed from the scheduler's part of a StatusReply."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from services.gateway.metrics import GatewayMetrics


def _values(metrics: GatewayMetrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_ttft_predictor_error_becomes_gauges() -> None:
    metrics = GatewayMetrics("m")
    metrics.update_scheduler({"flips_total": 2, "policy": {"ttft_predictor": {
        "mdape_pct": 12.5, "samples": 40, "unpredicted": 4, "model": {"a_s": 0.02, "b_s_per_token": 0.001}}}})
    values = _values(metrics)
    assert values["xllm_pd_flips"] == 2
    assert values["xllm_ttft_predictor_mdape_pct"] == 12.5
    assert values["xllm_ttft_predictor_samples"] == 40
    assert values["xllm_ttft_predictor_unpredicted"] == 4
    # Nothing scored yet: not a perfect 0 %.
    metrics.update_scheduler({"policy": {"ttft_predictor": {"mdape_pct": None, "samples": 0, "unpredicted": 4}}})
    assert math.isnan(_values(metrics)["xllm_ttft_predictor_mdape_pct"])


def test_a_scheduler_without_a_policy_snapshot_is_fine() -> None:
    metrics = GatewayMetrics("m")
    metrics.update_scheduler({"flips_total": 1, "policy": {}})
    metrics.update_scheduler({"flips_total": 1})
    assert _values(metrics)["xllm_pd_flips"] == 1


def _labelled(metrics: GatewayMetrics, name: str) -> dict[tuple, float]:
    text = metrics.render().decode()
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_moe_expert_load_becomes_gauges_and_leaves_with_the_worker() -> None:
    metrics = GatewayMetrics("m")
    load = {"tokens_per_expert": [[5, 0, 3, 0], [1, 1, 1, 1]], "rank_tokens": [9, 3],
            "rank_load_imbalance": 1.5, "rebalances": 2, "last_rebalance_compute_s": 0.25,
            "last_rebalance_apply_s": 0.5}
    metrics.update_workers([{"instance_id": "w0", "stats": {"expert_load": load}},
                            {"instance_id": "dense", "stats": {}}])
    experts = _labelled(metrics, "xllm_moe_expert_tokens")
    assert experts == {(("expert", str(e)), ("instance", "w0")): float(v) for e, v in enumerate([6, 1, 4, 1])}
    assert _labelled(metrics, "xllm_moe_rank_tokens") == {(("instance", "w0"), ("rank", "0")): 9.0,
                                                          (("instance", "w0"), ("rank", "1")): 3.0}
    assert _labelled(metrics, "xllm_moe_rank_load_imbalance") == {(("instance", "w0"),): 1.5}
    assert _labelled(metrics, "xllm_moe_eplb_last_rebalance_seconds") == {(("instance", "w0"),): 0.75}
    metrics.update_workers([{"instance_id": "dense", "stats": {}}])
    assert _labelled(metrics, "xllm_moe_expert_tokens") == {}
    assert _labelled(metrics, "xllm_moe_rank_load_imbalance") == {}


def test_dp_migrations_follow_the_schedulers_totals() -> None:
    metrics = GatewayMetrics("m")

    def counted() -> dict[str, float]:
        text = metrics.render().decode()
        return {s.labels["reason"]: s.value for family in text_string_to_metric_families(text)
                for s in family.samples if s.name == "xllm_dp_migrations_total"}

    metrics.update_scheduler({"dp_balance": {"migrations": {"running": 3}}})
    metrics.update_scheduler({"dp_balance": {"migrations": {"running": 5, "kv_pages": 1}}})
    assert counted() == {"running": 5, "kv_pages": 1}
    # A restarted scheduler counts from 0 again: the counter never goes down.
    metrics.update_scheduler({"dp_balance": {"migrations": {"running": 2, "kv_pages": 1}}})
    assert counted() == {"running": 7, "kv_pages": 1}
