"""P/D disaggregation over an int8 KV cache, with real processes: the prefill worker's int8 pages
(values and their inline scales) cross the kv socket, and greedy outputs are token-for-token those
of a single mixed worker with the same int8 cache."""

from __future__ import annotations

from typing import Any

import pytest

from test_pd_disaggregation import MAX_TOKENS, PROMPTS, complete, token_count

pytestmark = pytest.mark.timeout(600)

ENGINE_FLAGS = ("--max-num-batched-tokens", "48", "--page-size", "16", "--kv-cache-dtype", "int8")
PD_FLAGS = ("--prefill-workers", "1", "--decode-workers", "1", "--kv-transfer-timeout", "2", *ENGINE_FLAGS)


@pytest.fixture(scope="module")
def int8_reference(xllm_server_factory) -> dict[str, str]:
    mixed = xllm_server_factory(workers=1, extra_args=ENGINE_FLAGS)
    try:
        out = {}
        for prompt in PROMPTS:
            code, reply = complete(mixed, prompt)
            assert code == 200, reply
            out[prompt] = reply["choices"][0]["text"]
        return out
    finally:
        mixed.stop()


def test_int8_pd_outputs_match_a_mixed_int8_worker(int8_reference, xllm_server_factory) -> None:
    server: Any = xllm_server_factory(extra_args=PD_FLAGS)
    server.wait_until(lambda: len(server.status()["instances"]) == 2, 60, "both workers to register")
    for prompt in PROMPTS:
        code, reply = complete(server, prompt)
        assert code == 200, reply
        assert reply["choices"][0]["text"] == int8_reference[prompt], prompt[:40]
        assert token_count(reply) == MAX_TOKENS or reply["choices"][0]["finish_reason"] == "stop"
    stats = server.wait_until(
        lambda: (s := {i["id"]: i["stats"] for i in server.status()["instances"]})
        and s["decode-0"]["kv_received_ok"] >= len(PROMPTS) and s, 10, "the transfers in the stats")
    assert stats["prefill-0"]["kv_transfers_ok"] >= len(PROMPTS)
    assert stats["prefill-0"]["kv_transfer_fallbacks"] == 0
