"""Speculative decoding behind the real services: `xllm serve` with a prefill and a decode worker,
`--speculative-method suffix`; the decode side speculates on the sequences handed to it.

Greedy texts must be exactly those of one mixed worker without speculation (fp32, the servers'
test dtype), streamed deltas of several tokens must arrive whole, and /metrics must show the
decode worker's draft and accepted tokens.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from _bus_helpers import sse_events
from bench.spec_workload import repetitive_prompts

pytestmark = pytest.mark.timeout(900)

ENGINE_FLAGS = ("--max-num-batched-tokens", "64", "--page-size", "16")
SPEC_FLAGS = ("--speculative-method", "suffix", "--num-speculative-tokens", "4")
PD_FLAGS = ("--prefill-workers", "1", "--decode-workers", "1", *ENGINE_FLAGS, *SPEC_FLAGS)
PROMPTS = repetitive_prompts(2, 400, seed=3)
MAX_TOKENS = 40


def complete(server: Any, prompt: str) -> str:
    body = {"model": server.model_id(), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True}
    code, reply = server.request("POST", "/v1/completions", body, timeout_s=300)
    assert code == 200, reply
    return reply["choices"][0]["text"]


@pytest.fixture(scope="module")
def reference(xllm_server_factory) -> dict[str, str]:
    plain = xllm_server_factory(workers=1, extra_args=ENGINE_FLAGS)
    try:
        return {prompt: complete(plain, prompt) for prompt in PROMPTS}
    finally:
        plain.stop()


def test_decode_worker_speculates_after_the_handoff(reference, xllm_server_factory) -> None:
    server = xllm_server_factory(extra_args=PD_FLAGS)
    server.wait_until(lambda: len(server.status()["instances"]) == 2, 60, "both workers to register")
    for prompt in PROMPTS:
        assert complete(server, prompt) == reference[prompt]
    # Streamed: deltas of several tokens (accepted drafts) arrive whole.
    body = {"model": server.model_id(), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    events = list(sse_events(server, "/v1/completions", body))
    assert "".join(e["choices"][0].get("text") or "" for e in events if e.get("choices")) == reference[PROMPTS[0]]
    # Every request's KV came over the hand-off; the gateway's status copy lags a heartbeat, so wait.
    server.wait_until(
        lambda: (s := {i["id"]: i["stats"] for i in server.status()["instances"]})
        and s["decode-0"].get("spec_accepted_tokens_total", 0) > 0
        and s["decode-0"].get("kv_received_ok", 0) >= len(PROMPTS) + 1, 10,
        "accepted drafts and every hand-off in the stats")
    code, metrics = server.request("GET", "/metrics")
    assert code == 200
    accepted = re.search(r'xllm_spec_accepted_tokens_total\{instance="decode-0"\} (\S+)', metrics)
    drafted = re.search(r'xllm_spec_draft_tokens_total\{instance="decode-0"\} (\S+)', metrics)
    assert accepted and drafted and 0 < float(accepted.group(1)) <= float(drafted.group(1))
