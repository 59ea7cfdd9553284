"""A beam search whose worker is lost starts over whole on another worker: one new attempt with the
request's own sampling (same beam width) and prompt, its choices numbered as before."""

from __future__ import annotations

import asyncio
from typing import Any

from common.protocol import RequestError, Sampling, TokenDelta
from services.gateway.metrics import GatewayMetrics
from services.gateway.migration import MigrationPolicy, Migrator


class _Choice:
    def __init__(self, index: int) -> None:
        self.index, self.prompt_index, self.seed_index, self.sub = index, 0, index, "r"
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.migrations = 0


class _Client:
    def __init__(self) -> None:
        self.migration = MigrationPolicy()
        self.scheduler_id, self.scheduler_alive = "s1", True
        self.submitted: list[tuple[str, list[int], Sampling]] = []

    def instance_state(self, instance_id: str, incarnation: str) -> str:
        return "listed"

    def register(self, request_id: str, stream: Any) -> None: ...

    def unregister(self, request_id: str) -> None: ...

    def abort_soon(self, request_id: str, reason: str) -> None: ...

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: Sampling, arrival_time: float,
                     priority: str = "online") -> None:
        self.submitted.append((request_id, prompt_ids, sampling))


class _Stream:
    def put(self, msg: Any) -> None: ...


def test_lost_beam_search_restarts_whole() -> None:
    sampling = Sampling(n=3, temperature=0.0, max_tokens=8, use_beam_search=True, length_penalty=0.5)
    client = _Client()
    migrator = Migrator(client, GatewayMetrics("beam"), "r", _Stream(), 0.0, "online", sampling.to_dict(), [[1, 2, 3]])
    choices = [_Choice(i) for i in range(3)]
    asyncio.run(migrator.submit(migrator.add("r", 0, [1, 2, 3], sampling, choices)))
    lost = RequestError(request_id="r", code=503, message="gone", retriable=True, reason="worker_lost")
    assert asyncio.run(migrator.on_error(lost))
    (sub_id, prompt, resubmitted), = client.submitted[1:]
    assert prompt == [1, 2, 3] and resubmitted == sampling and all(c.sub == sub_id for c in choices)
    # The new attempt's deltas land on the same choices, by index.
    beam = TokenDelta(request_id=sub_id, index=2, token_ids=[5, 6], logprobs=None, finish_reason="length",
                      num_prompt_tokens=3, num_output_tokens=2)
    attempt, choice = migrator.locate(beam)
    assert choice is choices[2] and attempt.sub_id == sub_id
