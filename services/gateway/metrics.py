"""Prometheus metrics of the gateway, in their own CollectorRegistry (tests can run several apps).

Per-request values are recorded once per request (TTFT at the first token, the rest at the
end), never per token, so the streaming path stays light. Per-worker gauges are refreshed from
the scheduler's StatusReply.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
        self._worker_gauges = (self.worker_kv_usage, self.worker_used_pages, self.worker_prefix_hit,
                               self.worker_running, self.worker_waiting)
        self._instances: set[str] = set()

    def update_workers(self, instances: list[dict[str, Any]]) -> None:
        """Refresh per-worker gauges from a StatusReply; workers that left lose their series."""
        seen: set[str] = set()
        for inst in instances:
            instance_id = inst.get("instance_id") or inst.get("id")
            if not isinstance(instance_id, str):
                continue
            seen.add(instance_id)
            total = _number(inst.get("total_pages"))
            free = _number(inst.get("free_pages"))
            used = _number(inst.get("used_pages"), total - free if total else 0.0)
            self.worker_used_pages.labels(instance_id).set(used)
            self.worker_kv_usage.labels(instance_id).set(used / total if total else 0.0)
            self.worker_prefix_hit.labels(instance_id).set(_number(inst.get("prefix_hit_rate")))
            self.worker_running.labels(instance_id).set(_number(inst.get("running")))
            self.worker_waiting.labels(instance_id).set(_number(inst.get("waiting")))
        for gone in self._instances - seen:
            for gauge in self._worker_gauges:
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        self._instances = seen
        self.workers_ready.set(len(seen))

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


def _number(value: Any, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return float(value)
