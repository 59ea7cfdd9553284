"""Migration under P/D disaggregation (real processes): the decode worker holding a stream is
SIGKILLed after the KV hand-off; the stream completes with the text of a run without the fault
(the continuation is prefilled again: prompt + streamed tokens, on whoever is left)."""

from __future__ import annotations

import os
import signal

import pytest
from _migration_helpers import MAX_TOKENS, PROMPTS, Stream, body, holder


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(extra_args=("--prefill-workers", "1", "--decode-workers", "1"))


def test_decode_worker_death_after_handoff_migrates(server) -> None:
    model = server.model_id()
    request = body(model, PROMPTS[3], max_tokens=2 * MAX_TOKENS, logprobs=1)
    reference = Stream(server, request)
    reference.start()
    want = reference.result()
    stream = Stream(server, request)
    stream.start()
    found: dict = {}

    def on_decode() -> bool:
        assert stream.is_alive(), stream.error
        inst = holder(server, stream.request_id or "") if stream.chunks >= 3 else None
        if inst is not None and inst["role"] == "decode":
            found.update(inst)
        return bool(found)

    server.wait_until(on_decode, 120, "the stream to be decoded on the decode worker", interval_s=0.1)
    os.kill(found["stats"]["pid"], signal.SIGKILL)
    got = stream.result()
    assert got["texts"] == want["texts"] and got["tokens"] == want["tokens"]
    assert got["finish"] == {0: "length"}
