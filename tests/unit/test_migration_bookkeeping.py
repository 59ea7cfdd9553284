"""The gateway's migration bookkeeping (services/gateway/migration.py), against a fake bus client:
which attempts exist, what a continuation is submitted with, when a loss is noticed, limits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.protocol import RequestError, Sampling, TokenDelta
from services.gateway.metrics import GatewayMetrics
from services.gateway.migration import MigrationFailed, MigrationPolicy, Migrator, continuation_sampling


class FakeStream:
    def __init__(self) -> None:
        self.items: list = []

    def put(self, msg: Any) -> None:
        self.items.append(msg)


class FakeChoice:
    def __init__(self, index: int, prompt_index: int = 0, seed_index: int = 0, sub: str = "r") -> None:
        self.index, self.prompt_index, self.seed_index, self.sub = index, prompt_index, seed_index, sub
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.migrations = 0


class FakeClient:
    def __init__(self, policy: MigrationPolicy | None = None) -> None:
        self.migration = policy or MigrationPolicy()
        self.scheduler_id = "s1"
        self.scheduler_alive = True
        self.states: dict[tuple[str, str], str] = {}
        self.registered: set[str] = set()
        self.submitted: list[tuple[str, list[int], Sampling]] = []
        self.aborted: list[str] = []

    def instance_state(self, instance_id: str, incarnation: str) -> str:
        return self.states.get((instance_id, incarnation), "listed")

    def register(self, request_id: str, stream: Any) -> None:
        self.registered.add(request_id)

    def unregister(self, request_id: str) -> None:
        self.registered.discard(request_id)

    def abort_soon(self, request_id: str, reason: str) -> None:
        self.aborted.append(request_id)

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: Sampling, arrival_time: float,
                     priority: str = "online") -> None:
        self.submitted.append((request_id, prompt_ids, sampling))


BASE = Sampling(n=2, temperature=0.8, seed=10, max_tokens=20, min_tokens=5).to_dict()


def make(policy: MigrationPolicy | None = None) -> tuple[Migrator, FakeClient, list[FakeChoice]]:
    client = FakeClient(policy)
    migrator = Migrator(client, GatewayMetrics("m"), "r", FakeStream(), 0.0, "online", BASE, [[1, 2, 3]])
    choices = [FakeChoice(0, seed_index=0), FakeChoice(1, seed_index=1)]
    attempt = migrator.add("r", 0, [1, 2, 3], Sampling(**BASE), choices)
    asyncio.run(migrator.submit(attempt))
    return migrator, client, choices


def delta(request_id: str, index: int, tokens: list[int], total: int, instance: str = "w0") -> TokenDelta:
    return TokenDelta(request_id=request_id, index=index, token_ids=tokens, logprobs=None, finish_reason=None,
                      num_prompt_tokens=3, num_output_tokens=total, instance_id=instance, incarnation="a")


def test_continuation_sampling_counts_what_is_left() -> None:
    choice = FakeChoice(1, seed_index=1)
    choice.token_ids = [7, 8, 9]
    s = continuation_sampling(BASE, choice)
    assert s is not None and (s.n, s.max_tokens, s.min_tokens, s.seed) == (1, 17, 2, 11)
    choice.token_ids = list(range(20))
    assert continuation_sampling(BASE, choice) is None  # nothing left to generate
    assert continuation_sampling({**BASE, "max_tokens": None, "seed": None}, choice).max_tokens is None


def test_worker_lost_resubmits_each_unfinished_choice_with_its_tokens() -> None:
    migrator, client, choices = make()
    attempt, choice = migrator.locate(delta("r", 0, [5], 1))
    migrator.note_delta(attempt, delta("r", 0, [5], 1))
    choices[0].token_ids = [5, 6]
    choices[1].token_ids = [9]
    handled = asyncio.run(migrator.on_error(RequestError(request_id="r", code=503, message="worker died (w0)",
                                                         retriable=True, reason="worker_lost")))
    assert handled and "r" in client.aborted and "r" not in client.registered
    subs = {sub: (prompt, sampling) for sub, prompt, sampling in client.submitted[1:]}
    assert set(subs) == {choices[0].sub, choices[1].sub} and len(subs) == 2
    prompt0, s0 = subs[choices[0].sub]
    prompt1, s1 = subs[choices[1].sub]
    assert prompt0 == [1, 2, 3, 5, 6] and (s0.n, s0.seed, s0.max_tokens) == (1, 10, 18)
    assert prompt1 == [1, 2, 3, 9] and (s1.seed, s1.max_tokens) == (11, 19)
    assert choices[0].migrations == choices[1].migrations == 1
    # a late delta of the lost attempt is stale; the new attempt's positions count from its base
    assert migrator.locate(delta("r", 0, [6], 2)) is None
    new, choice = migrator.locate(delta(choices[0].sub, 0, [7], 1, instance="w1"))
    assert choice is choices[0] and new.bases == [2]


def test_finished_choices_are_not_migrated_and_the_limit_fails_the_request() -> None:
    migrator, client, choices = make(MigrationPolicy(max_migrations=1))
    choices[1].finish_reason = "stop"
    lost = RequestError(request_id="r", code=503, message="gone", retriable=True, reason="worker_lost")
    asyncio.run(migrator.on_error(lost))
    assert len(client.submitted) == 2 and choices[1].sub == "r"
    again = RequestError(request_id=choices[0].sub, code=503, message="gone", retriable=True, reason="worker_lost")
    with pytest.raises(MigrationFailed) as failure:
        asyncio.run(migrator.on_error(again))
    assert failure.value.status == 503 and failure.value.code == "worker_lost"


def test_a_non_retriable_error_fails_and_a_stale_one_is_ignored() -> None:
    migrator, _, _ = make()
    assert not asyncio.run(migrator.on_error(RequestError(request_id="r", code=400, message="bad")))
    assert asyncio.run(migrator.on_error(RequestError(request_id="old", code=400, message="bad")))


def test_status_says_the_streaming_worker_is_dead_or_gone() -> None:
    migrator, client, choices = make(MigrationPolicy(unlisted_grace_s=1.0))
    migrator.note_delta(migrator.attempts["r"], delta("r", 0, [5], 1, instance="w0"))
    client.states[("w0", "a")] = "dead"
    asyncio.run(migrator.watch(now=1.0))
    assert "r" not in migrator.attempts and len(client.submitted) == 3
    # a restarted scheduler that never lists the worker: lost after the grace period
    sub = choices[0].sub
    migrator.note_delta(migrator.attempts[sub], delta(sub, 0, [6], 1, instance="w9"))
    client.states[("w9", "a")] = "unlisted"
    asyncio.run(migrator.watch(now=2.0))
    assert sub in migrator.attempts
    asyncio.run(migrator.watch(now=3.5))
    assert sub not in migrator.attempts


def test_scheduler_restart_before_the_first_token_resubmits_under_a_new_id() -> None:
    migrator, client, choices = make()
    client.scheduler_id = "s2"
    asyncio.run(migrator.watch(now=1.0))
    assert "r" in client.aborted and len(client.submitted) == 3
    assert choices[0].migrations == 0  # not a lost worker: does not count against the limit


def test_no_worker_is_retried_after_a_backoff_and_the_deadline_fails() -> None:
    migrator, client, _ = make(MigrationPolicy(retry_backoff_s=0.5, request_timeout_s=100.0))
    asyncio.run(migrator.on_error(RequestError(request_id="r", code=503, message="no worker available",
                                               retriable=True, reason="no_worker")))
    attempt = migrator.attempts["r"]
    assert attempt.retry_at is not None and len(client.submitted) == 1
    asyncio.run(migrator.watch(now=attempt.retry_at + 0.01))
    assert len(client.submitted) == 3 and "r" not in migrator.attempts
    with pytest.raises(MigrationFailed) as failure:
        asyncio.run(migrator.watch(now=migrator.deadline + 1))
    assert failure.value.status == 504


def test_a_choice_with_all_its_tokens_out_is_finished_not_resubmitted() -> None:
    migrator, client, choices = make()
    choices[0].token_ids = list(range(20))  # max_tokens reached; only the finish was lost
    choices[1].finish_reason = "length"
    asyncio.run(migrator.on_error(RequestError(request_id="r", code=503, message="gone", retriable=True,
                                               reason="worker_lost")))
    assert len(client.submitted) == 1  # nothing new on the bus
    (finish,) = migrator.stream.items
    assert finish.request_id == choices[0].sub and finish.finish_reason == "length" and finish.token_ids == []
    attempt, choice = migrator.locate(finish)
    assert choice is choices[0] and attempt.bases == [20]
