"""`xllm_spec_draft_tokens_total{instance}` and `xllm_spec_accepted_tokens_total{instance}` on /metrics.

Speculative decoding's counters are owned by each worker's engine and arrive in its heartbeat
stats (`LLMEngine.load_stats`); the gateway only reads them from the last status, hence a collector.
acceptance rate = accepted / draft; the mean accepted length per step is in each worker's /status stats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["SpeculativeCounters"]

_COUNTERS = (
    ("xllm_spec_draft_tokens", "spec_draft_tokens_total", "Speculative draft tokens verified on a worker"),
    ("xllm_spec_accepted_tokens", "spec_accepted_tokens_total", "Speculative draft tokens accepted on a worker"),
)


class SpeculativeCounters(Collector):
    def __init__(self, instances: Callable[[], list[dict[str, Any]]]) -> None:
        self.instances = instances

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = [(CounterMetricFamily(name, doc, labels=["instance"]), key) for name, key, doc in _COUNTERS]
        for inst in self.instances():
            instance_id = inst.get("instance_id") or inst.get("id")
            stats = inst.get("stats")
            if not isinstance(instance_id, str) or not isinstance(stats, dict):
                continue
            for family, key in families:
                value = stats.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    family.add_metric([instance_id], value)
        for family, _ in families:
            yield family
