"""Prometheus metrics of the gateway, in their own CollectorRegistry (tests can run several apps).

Per-request values are recorded once per request (TTFT at the first token, the rest at the
end), never per token, so the streaming path stays light. Per-worker gauges are refreshed from
the scheduler's StatusReply.
"""

from __future__ import annotations

import math
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.gateway.metric_values import as_number, remove_series
from services.gateway.moe_metrics import MoeMetrics

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_id: str) -> None:
        self.registry = registry = CollectorRegistry()
        self.model_id = model_id
        self.ttft = Histogram("xllm_time_to_first_token_seconds", "Time from request arrival to the first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("xllm_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              buckets=_TPOT_BUCKETS, registry=registry)
        self.e2e = Histogram("xllm_e2e_request_latency_seconds", "Time from request arrival to its last token",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.running = Gauge("xllm_num_requests_running", "Requests producing tokens", registry=registry)
        self.waiting = Gauge("xllm_num_requests_waiting", "Requests submitted and waiting for their first token",
                             registry=registry)
        self.prompt_tokens = Counter("xllm_prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.generation_tokens = Counter("xllm_generation_tokens", "Generated tokens", registry=registry)
        self.requests_finished = Counter("xllm_requests_finished", "Finished choices by finish reason",
                                         ["finish_reason"], registry=registry)
        self.http_responses = Counter("xllm_http_responses", "HTTP responses by status code", ["status"],
                                      registry=registry)
        self.worker_kv_usage = Gauge("xllm_worker_kv_cache_usage_ratio", "Fraction of a worker's KV pages in use",
                                     ["instance"], registry=registry)
        self.worker_used_pages = Gauge("xllm_worker_kv_pages_used", "KV pages in use on a worker", ["instance"],
                                       registry=registry)
        self.worker_prefix_hit = Gauge("xllm_worker_prefix_cache_hit_rate", "Prefix-cache hit rate of a worker",
                                       ["instance"], registry=registry)
        self.worker_running = Gauge("xllm_worker_requests_running", "Sequences running on a worker", ["instance"],
                                    registry=registry)
        self.worker_waiting = Gauge("xllm_worker_requests_waiting", "Sequences waiting on a worker", ["instance"],
                                    registry=registry)
        self.workers_ready = Gauge("xllm_workers", "Workers known to the scheduler", registry=registry)
        self.worker_queued_prefill = Gauge("xllm_worker_queued_prefill_tokens",
                                           "Prompt tokens queued for prefill on a worker", ["instance"],
                                           registry=registry)
        self.worker_flips = Gauge("xllm_worker_role_flips", "Role flips a worker went through", ["instance"],
                                  registry=registry)
        self.worker_flip_latency = Gauge("xllm_worker_flip_latency_seconds",
                                         "Time from a worker's last role flip to its first work in the new role",
                                         ["instance"], registry=registry)
        self.worker_kv_transfers = Gauge("xllm_worker_kv_transfers",
                                         "KV hand-offs of a worker by outcome (sent_ok, failed, fallback, received)",
                                         ["instance", "outcome"], registry=registry)
        self.worker_role = Gauge("xllm_worker_role", "1 for a worker's current role, 0 for the others",
                                 ["instance", "role"], registry=registry)
        self.pd_flips = Gauge("xllm_pd_flips", "Role flips the scheduler ordered", registry=registry)
        self.ttft_mdape = Gauge("xllm_ttft_predictor_mdape_pct",
                                "Median absolute percentage error of the scheduler's TTFT predictions against "
                                "measured TTFT, over its recent window (NaN: nothing scored yet)", registry=registry)
        self.ttft_mdape_samples = Gauge("xllm_ttft_predictor_samples",
                                        "Measured TTFTs the predictor error is computed over", registry=registry)
        self.ttft_unpredicted = Gauge("xllm_ttft_predictor_unpredicted",
                                      "Measured TTFTs not scored: the predictor had too few points to predict",
                                      registry=registry)
        self.prefix_hit_tokens = Gauge("xllm_prefix_hit_tokens",
                                       "Prompt tokens served from cached KV instead of computed, by tier "
                                       "(hbm: a worker's own pages; dram / ssd: reloaded from the kvstore)",
                                       ["tier"], registry=registry)
        self.kvstore_bytes = Gauge("xllm_kvstore_bytes", "Bytes of KV blocks the kvstore holds, by tier", ["tier"],
                                   registry=registry)
        self.kvstore_blocks = Gauge("xllm_kvstore_blocks", "KV blocks the kvstore holds, by tier", ["tier"],
                                    registry=registry)
        self.kvstore_corrupt = Gauge("xllm_kvstore_corrupt_entries",
                                     "Stored blocks that failed their checksum (served as misses)", registry=registry)
        self.requests_migrated = Counter(
            "xllm_requests_migrated", "Choices re-submitted elsewhere because their worker was lost, by reason "
            "(worker_lost, no_worker, scheduler_restart)", ["reason"], registry=registry)
        self.migration_seconds = Histogram(
            "xllm_migration_seconds", "From a worker's loss being noticed to the next token of the migrated stream",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.migration_tokens = Counter(
            "xllm_migration_tokens", "Tokens a migrated choice's new worker had to take over, by how: reused "
            "(found in its prefix cache) or recomputed", ["how"], registry=registry)
        self.requests_failed_migration = Counter(
            "xllm_requests_failed_migration", "Requests that failed because their migrations ran out or their "
            "deadline passed, by reason", ["reason"], registry=registry)
        self.dp_migrations = Counter(
            "xllm_dp_migrations", "Running sequences the scheduler's DP balancer moved to another worker, by "
            "reason (running: sequence-count imbalance, kv_pages: KV-page pressure)", ["reason"], registry=registry)
        self._dp_migrations_seen: dict[str, float] = {}
        self._worker_gauges = (self.worker_kv_usage, self.worker_used_pages, self.worker_prefix_hit,
                               self.worker_running, self.worker_waiting, self.worker_queued_prefill,
                               self.worker_flips, self.worker_flip_latency)
        self.moe = MoeMetrics(registry)
        self._instances: set[str] = set()

    def update_workers(self, instances: list[dict[str, Any]]) -> None:
        """Refresh per-worker gauges from a StatusReply; workers that left lose their series."""
        seen: set[str] = set()
        hits = {tier: 0.0 for tier in _TIERS}
        for inst in instances:
            instance_id = inst.get("instance_id") or inst.get("id")
            if not isinstance(instance_id, str):
                continue
            seen.add(instance_id)
            total = as_number(inst.get("total_pages"))
            free = as_number(inst.get("free_pages"))
            used = as_number(inst.get("used_pages"), total - free if total else 0.0)
            self.worker_used_pages.labels(instance_id).set(used)
            self.worker_kv_usage.labels(instance_id).set(used / total if total else 0.0)
            self.worker_prefix_hit.labels(instance_id).set(as_number(inst.get("prefix_hit_rate")))
            self.worker_running.labels(instance_id).set(as_number(inst.get("running")))
            self.worker_waiting.labels(instance_id).set(as_number(inst.get("waiting")))
            self.worker_queued_prefill.labels(instance_id).set(as_number(inst.get("queued_prefill_tokens")))
            stats = inst.get("stats") if isinstance(inst.get("stats"), dict) else {}
            self.worker_flips.labels(instance_id).set(as_number(stats.get("flips_total")))
            latency = as_number(stats.get("last_flip_latency_s"), -1.0)
            if latency >= 0:
                self.worker_flip_latency.labels(instance_id).set(latency)
            for outcome, key in _TRANSFER_OUTCOMES.items():
                self.worker_kv_transfers.labels(instance_id, outcome).set(as_number(stats.get(key)))
            for role in _ROLES:
                self.worker_role.labels(instance_id, role).set(1.0 if inst.get("role") == role else 0.0)
            self.moe.update(instance_id, stats)
            worker_hits = stats.get("prefix_hit_tokens")
            if isinstance(worker_hits, dict):
                for tier in _TIERS:
                    hits[tier] += as_number(worker_hits.get(tier))
        for tier, tokens in hits.items():
            self.prefix_hit_tokens.labels(tier).set(tokens)
        for gone in self._instances - seen:
            for gauge in self._worker_gauges:
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
            for outcome in _TRANSFER_OUTCOMES:
                remove_series(self.worker_kv_transfers, gone, outcome)
            for role in _ROLES:
                remove_series(self.worker_role, gone, role)
            self.moe.forget(gone)
        self._instances = seen
        self.workers_ready.set(len(seen))

    def update_scheduler(self, info: dict[str, Any]) -> None:
        self.pd_flips.set(as_number(info.get("flips_total")))
        balance = info.get("dp_balance")
        moved = balance.get("migrations") if isinstance(balance, dict) else None
        if isinstance(moved, dict):
            for reason, total in moved.items():
                # The scheduler reports totals; a restarted one starts again from 0.
                seen = self._dp_migrations_seen.get(str(reason), 0.0)
                total = as_number(total)
                self.dp_migrations.labels(str(reason)).inc(total - seen if total >= seen else total)
                self._dp_migrations_seen[str(reason)] = total
        policy = info.get("policy")
        predictor = policy.get("ttft_predictor") if isinstance(policy, dict) else None
        if isinstance(predictor, dict):
            # NaN, not 0, while nothing was scored: 0 % would read as a perfect predictor.
            self.ttft_mdape.set(as_number(predictor.get("mdape_pct"), math.nan))
            self.ttft_mdape_samples.set(as_number(predictor.get("samples")))
            self.ttft_unpredicted.set(as_number(predictor.get("unpredicted")))
        store = info.get("kvstore")
        if isinstance(store, dict) and store:
            for tier in ("dram", "ssd"):
                self.kvstore_bytes.labels(tier).set(as_number(store.get(f"{tier}_bytes")))
                self.kvstore_blocks.labels(tier).set(as_number(store.get(f"{tier}_blocks")))
            self.kvstore_corrupt.set(as_number(store.get("corrupt_entries")))

    def record_request(self, prompt_tokens: int, output_tokens: int, finish_reasons: list[str],
                       arrival: float, first_token: float | None, end: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        for reason in finish_reasons:
            self.requests_finished.labels(reason).inc()
        if "abort" in finish_reasons or "error" in finish_reasons:
            return  # cut short: its latencies would only blur the histograms
        self.e2e.observe(end - arrival)
        choices = max(1, len(finish_reasons))
        if first_token is not None and output_tokens > choices:
            # every choice's tokens after its first are spread over (end - first_token)
            self.tpot.observe((end - first_token) * choices / (output_tokens - choices))

    def render(self) -> bytes:
        return generate_latest(self.registry)


_ROLES = ("prefill", "decode", "mixed")
_TIERS = ("hbm", "dram", "ssd")
_TRANSFER_OUTCOMES = {"sent_ok": "kv_transfers_ok", "failed": "kv_transfers_failed",
                      "fallback": "kv_transfer_fallbacks", "received": "kv_received_ok"}


