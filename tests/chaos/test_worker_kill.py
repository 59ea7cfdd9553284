"""Kill -9 under load, three mixed workers: 16 concurrent greedy streams lose one worker at a
random point mid-stream, then a second one; another 16 lose the scheduler. Every stream must
finish with exactly the tokens of the no-fault run (no token repeated or skipped, the SSE offsets
contiguous), and afterwards every worker is idle with its KV pages back and a clean pool audit."""

from __future__ import annotations

import asyncio
import random

import pytest

from _chaos_helpers import (STREAMS, assert_streams_match, kill_busiest_worker, kill_scheduler, metric, prompts,
                            run_streams, tokens_received, wait_all_workers_up, wait_tokens)

MAX_TOKENS = 24
SEED = 20261127


pytestmark = pytest.mark.slow  # real processes, started and killed: tens of seconds


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=3)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return prompts(STREAMS, SEED)


@pytest.fixture(scope="module")
def references(server, texts) -> list[list[str]]:
    """The no-fault run: the same 16 prompts, streamed at once, nothing killed."""
    records, _ = asyncio.run(run_streams(server.base_url, server.model_id(), texts, MAX_TOKENS))
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    assert all(len(r.tokens) == MAX_TOKENS for r in records)
    return [r.tokens for r in records]


def test_two_workers_killed_mid_stream(server, texts, references, settle_pools):
    rng = random.Random(SEED)
    total = STREAMS * MAX_TOKENS
    # Random points mid-stream: the first kill in the first third of the run, the second once the
    # streams the first one moved have made progress again, before two thirds.
    first_at, second_at = rng.randint(STREAMS, total // 3), rng.randint(total // 3 + STREAMS, 2 * total // 3)
    migrated_before = metric(server, "xllm_requests_migrated_total")

    async def chaos(records):
        await wait_tokens(records, first_at)
        first = await kill_busiest_worker(server, exclude=set())
        await wait_tokens(records, max(second_at, tokens_received(records) + STREAMS))
        second = await kill_busiest_worker(server, exclude={first[0]})
        return first, second

    records, (first, second) = asyncio.run(run_streams(server.base_url, server.model_id(), texts, MAX_TOKENS, chaos))

    assert first[2] > 0, f"the first victim {first[0]} held no request"
    assert_streams_match(records, references)
    # The streams on the victims moved to survivors, and the gateway counted it.
    assert metric(server, "xllm_requests_migrated_total") - migrated_before >= 1
    wait_all_workers_up(server)
    settle_pools(server)


def test_scheduler_killed_mid_stream(server, texts, references, settle_pools):
    wait_all_workers_up(server)
    rng = random.Random(SEED + 1)
    kill_at = rng.randint(STREAMS, STREAMS * MAX_TOKENS // 2)

    async def chaos(records):
        await wait_tokens(records, kill_at)
        return kill_scheduler(server)

    records, pid = asyncio.run(run_streams(server.base_url, server.model_id(), texts, MAX_TOKENS, chaos))

    assert pid > 0
    assert_streams_match(records, references)
    # The restarted scheduler learns the workers again; nothing is left held anywhere.
    wait_all_workers_up(server)
    settle_pools(server)
    # And it serves new work.
    assert server.complete("Hello", max_tokens=2)["choices"][0]["text"] is not None
