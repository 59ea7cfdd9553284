"""Kill -9 in a P/D topology (one prefill worker and two decode workers, then one of each): a
decode worker dies while 16 greedy streams are being prefilled and handed over to the decode pool,
so some hand-offs are in flight or just landed on it (with one decode worker, the whole pool is
gone until the launcher restarts it). Every stream must still finish with the no-fault tokens, and
every worker ends idle with its pages back and a clean page-pool audit."""

from __future__ import annotations

import asyncio

import pytest

from _chaos_helpers import (STREAMS, assert_streams_match, get_json, held_requests, kill_busiest_worker, prompts,
                            run_streams, wait_all_workers_up, wait_tokens)

MAX_TOKENS = 16
SEED = 7


pytestmark = pytest.mark.slow  # real processes, started and killed: tens of seconds


@pytest.fixture(scope="module", params=[2, 1], ids=["1p2d", "1p1d"])
def server(request, xllm_server_factory):
    server = xllm_server_factory(extra_args=("--prefill-workers", "1", "--decode-workers", str(request.param)))
    yield server
    server.stop()  # one server at a time: this topology's before the next one starts


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return prompts(STREAMS, SEED)


def test_decode_worker_killed_mid_handoff(server, texts, settle_pools):
    roles = {iid: inst["role"] for iid, inst in server.instances().items()}
    expected_roles = sorted(roles.values())
    assert expected_roles.count("prefill") == 1 and "decode" in expected_roles, roles
    model = server.model_id()
    reference, _ = asyncio.run(run_streams(server.base_url, model, texts, MAX_TOKENS))
    assert all(r.ok for r in reference), [r.error for r in reference if not r.ok]
    references = [r.tokens for r in reference]

    async def chaos(records):
        # The first token comes from the prefill worker as soon as a prompt is prefilled, and its
        # KV goes to a decode worker right then; with 16 prompts prefilled one batch after the
        # other, hand-offs are under way from this point on.
        await wait_tokens(records, 1)
        # Then wait (briefly) until the scheduler lists a decode worker holding some of them.
        for _ in range(100):
            status = await asyncio.to_thread(get_json, server.base_url, "/status")
            if any(held_requests(status).get(i) for i, role in roles.items() if role == "decode"):
                break
            await asyncio.sleep(0.05)
        waiting_first_token = sum(1 for r in records if not r.tokens)
        return (*await kill_busiest_worker(server, exclude=set(), role="decode"), waiting_first_token)

    records, (victim, _pid, held, not_started) = asyncio.run(
        run_streams(server.base_url, model, texts, MAX_TOKENS, chaos))

    assert roles[victim] == "decode"
    assert held > 0, "the decode worker held no stream when it was killed"
    print(f"killed {victim} holding {held} stream(s); {not_started} stream(s) were still waiting for a first token")
    assert_streams_match(records, references)
    wait_all_workers_up(server)
    instances = settle_pools(server)
    # The roles survive the fault: the restarted worker comes back in the decode role.
    assert sorted(inst["role"] for inst in instances.values()) == expected_roles
