"""The gateway's /metrics reports each worker's speculative decoding counters."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from services.gateway.spec_metrics import SpeculativeCounters


def test_counters_come_from_the_workers_stats():
    instances = [
        {"instance_id": "decode-0", "stats": {"spec_draft_tokens_total": 40, "spec_accepted_tokens_total": 31}},
        {"instance_id": "prefill-0", "stats": {"running": 1}},  # speculation off: no series
        {"instance_id": "odd", "stats": "junk"},
    ]
    registry = CollectorRegistry()
    registry.register(SpeculativeCounters(lambda: instances))
    text = generate_latest(registry).decode()
    assert 'xllm_spec_draft_tokens_total{instance="decode-0"} 40.0' in text
    assert 'xllm_spec_accepted_tokens_total{instance="decode-0"} 31.0' in text
    assert "prefill-0" not in text and "odd" not in text
