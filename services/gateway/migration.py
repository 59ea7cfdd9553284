"""Request migration: a choice whose worker is lost continues on another one, in the same stream.

Why the gateway drives it: the gateway is the one place that holds everything a continuation
needs (the prompt ids, every token already streamed per choice, the client's stream and its
detokenizer / stop-string state) and the one place that can tell a duplicate token from a new
one. The scheduler only knows which worker a request was on, and a restarted scheduler knows
nothing at all; a worker that died took its state with it. So the scheduler reports the loss
(a retriable `RequestError`, reason "worker_lost") and the gateway re-submits.

A generation's work on the bus is a set of *attempts*: sub-requests with their own request id.
At first there is one per prompt (with its n choices). When an attempt is lost, each of its
unfinished choices is re-submitted as a new attempt of its own: prompt + the tokens already
streamed, `n=1`, `max_tokens` = what is left, the choice's own seed (`seed + index`, what the
engine gives choice `index`; sampling noise is a pure function of (seed, output position), so the
continuation draws what the original would have). Its deltas count output positions from the
tokens it started with (`Attempt.bases`), so the generation's dedup by position stays exact: no
token twice, none missing. The new worker finds the prefix in its cache (or the kvstore) when a
copy exists, and recomputes it otherwise.

A loss is noticed by whichever comes first:
- the scheduler's retriable error (the worker was declared dead, replaced, or left);
- the status: the worker that last streamed for an attempt (`TokenDelta.instance_id` +
  `incarnation`) is listed dead, or its id belongs to a new incarnation, or it stays unlisted
  by a fresh status (a restarted scheduler never heard of it) for `unlisted_grace_s`;
- a scheduler restart (its id changes) before an attempt streamed anything: its Submit may have
  died with the old scheduler, so it is sent again under a new id (the old one is aborted).

"No worker available" (every worker dead or restarting) is retried with a backoff. Each choice
may be migrated `max_migrations` times because of a lost worker; after that, or once the
request's deadline passes, the request fails with a clear error (in-stream for SSE).

Known limits: frequency/presence/repetition penalties count the streamed tokens as prompt tokens
after a migration, so a penalised sampled choice may diverge from an unfaulted run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from common.protocol import ImageMeta, RequestError, Sampling, TokenDelta

__all__ = ["MigrationPolicy", "Attempt", "Migrator", "MigrationFailed", "continuation_sampling"]

logger = logging.getLogger(__name__)

SUBMIT_TIMEOUT_S = 5.0
# Reasons a choice moves; only a lost worker counts against the migration limit.
COUNTED_REASONS = frozenset(("worker_lost",))

# A prompt's images as the bus carries them: their metadata and one raw frame each (common.image_frames).
ImageFrames = tuple[list[ImageMeta], list[torch.Tensor]]


@dataclass(frozen=True)
class MigrationPolicy:
    max_migrations: int = 3  # per choice, for lost workers
    request_timeout_s: float = 600.0  # the whole request's deadline
    scheduler_wait_s: float = 30.0  # how long a new request waits for a scheduler that went away
    unlisted_grace_s: float = 5.0  # a fresh status without the streaming worker for this long: lost
    retry_backoff_s: float = 0.5  # first wait before re-submitting when no worker was available


class MigrationFailed(Exception):
    """The request cannot go on: `status`, `message`, `code` say why (an OpenAI-style error)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class ChoiceLike(Protocol):
    """What migration reads and updates of one choice of the generation."""

    index: int  # in the response
    prompt_index: int
    seed_index: int  # within its prompt: its seed is seed + seed_index
    sub: str  # the attempt that computes it now
    finish_reason: str | None
    token_ids: list[int]  # every output token received so far
    migrations: int


class BusLike(Protocol):
    """The parts of the gateway's BusClient migration uses."""

    migration: MigrationPolicy

    @property
    def scheduler_id(self) -> str: ...

    @property
    def scheduler_alive(self) -> bool: ...

    def instance_state(self, instance_id: str, incarnation: str) -> str: ...

    def register(self, request_id: str, stream: Any) -> None: ...

    def unregister(self, request_id: str) -> None: ...

    def abort_soon(self, request_id: str, reason: str) -> None: ...

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: Sampling, arrival_time: float,
                     priority: str = "online", *, images: ImageFrames | None = None) -> None: ...


@dataclass(eq=False)
class Attempt:
    """One sub-request on the bus: `choices[i]` is its choice i; `bases[i]` the output tokens that
    choice already had when it was submitted (its deltas count from there)."""

    sub_id: str
    prompt_index: int
    prompt_ids: list[int]
    sampling: Sampling
    choices: list[Any]
    bases: list[int]
    epoch: str = ""  # the scheduler id it was sent to ("": not sent yet)
    instance_id: str = ""  # the worker that last streamed for it
    incarnation: str = ""
    started: bool = False
    unlisted_since: float | None = None
    lost_at: float | None = None  # when the loss this attempt recovers from was noticed
    reason: str = ""  # why it exists ("" for an original attempt)
    retry_at: float | None = None  # set while waiting to be re-submitted (no worker)
    retries: int = 0
    recompute: list[int] = field(default_factory=list)

    def owns(self, choice: Any) -> bool:
        return choice.sub == self.sub_id


def continuation_sampling(base: dict[str, Any], choice: ChoiceLike) -> Sampling | None:
    """The sampling of a choice continued after `len(choice.token_ids)` tokens, from the request's
    own (`base`); None: nothing is left to generate."""
    done = len(choice.token_ids)
    values = dict(base)
    values["n"] = 1
    if values.get("max_tokens") is not None:
        values["max_tokens"] = values["max_tokens"] - done
        if values["max_tokens"] <= 0:
            return None
    values["min_tokens"] = max(0, int(values.get("min_tokens") or 0) - done)
    if values.get("seed") is not None:
        values["seed"] = values["seed"] + choice.seed_index
    if values.get("structured_kind") is not None:
        values["structured_prefix_tokens"] = done  # the streamed outputs end the prompt: the grammar replays them
    return Sampling(**values)


class Migrator:
    """The attempts of one generation, their loss and their re-submission."""

    def __init__(self, client: BusLike, metrics: Any, request_id: str, stream: Any, arrival: float,
                 priority: str, base_sampling: dict[str, Any], prompts: list[list[int]],
                 images: list[ImageFrames | None] | None = None) -> None:
        self.client = client
        self.policy = client.migration
        self.metrics = metrics
        self.request_id = request_id
        self.stream = stream
        self.arrival = arrival
        self.priority = priority
        self.base_sampling = base_sampling
        self.prompts = prompts
        # Per prompt: its images, sent again with every attempt (a continuation's offsets are unchanged).
        self.images = images or [None] * len(prompts)
        self.deadline = time.monotonic() + self.policy.request_timeout_s
        self.attempts: dict[str, Attempt] = {}
        self._counter = 0
        self._checked_at = 0.0

    # ---- attempts -------------------------------------------------------------------------

    def add(self, sub_id: str, prompt_index: int, prompt_ids: list[int], sampling: Sampling,
            choices: Sequence[Any]) -> Attempt:
        attempt = Attempt(sub_id, prompt_index, prompt_ids, sampling, list(choices),
                          [len(c.token_ids) for c in choices])
        self.attempts[sub_id] = attempt
        self.client.register(sub_id, self.stream)
        return attempt

    async def submit(self, attempt: Attempt) -> None:
        """Send it; a send the scheduler does not take in time is retried by `watch` later."""
        epoch = self.client.scheduler_id
        try:
            async with asyncio.timeout(SUBMIT_TIMEOUT_S):  # (not wait_for: see client._status_loop)
                images = self.images[attempt.prompt_index]
                await self.client.submit(attempt.sub_id, attempt.prompt_ids, attempt.sampling, self.arrival,
                                         self.priority, **({"images": images} if images is not None else {}))
        except TimeoutError:
            logger.warning("request %s: the scheduler did not take the submit; retrying later", attempt.sub_id)
            epoch = ""
        attempt.epoch = epoch

    def end(self, attempt: Attempt) -> None:
        """It is over (every choice it owns ended, or it was migrated away)."""
        if self.attempts.pop(attempt.sub_id, None) is not None:
            self.client.unregister(attempt.sub_id)

    def live(self) -> list[Attempt]:
        return list(self.attempts.values())

    def locate(self, delta: TokenDelta) -> tuple[Attempt, Any] | None:
        """The attempt and choice a delta belongs to (None: stale, from an attempt given up)."""
        attempt = self.attempts.get(delta.request_id)
        if attempt is None or not 0 <= delta.index < len(attempt.choices):
            return None
        choice = attempt.choices[delta.index]
        return (attempt, choice) if attempt.owns(choice) else None

    def note_delta(self, attempt: Attempt, delta: TokenDelta) -> None:
        if delta.instance_id:
            attempt.instance_id, attempt.incarnation = delta.instance_id, delta.incarnation
        attempt.unlisted_since = None
        if not attempt.started:
            attempt.started = True
            if attempt.lost_at is not None:
                self.metrics.migration_seconds.observe(time.monotonic() - attempt.lost_at)
                reused = min(delta.cached_tokens, len(attempt.prompt_ids))
                self.metrics.migration_tokens.labels("reused").inc(reused)
                self.metrics.migration_tokens.labels("recomputed").inc(len(attempt.prompt_ids) - reused)

    # ---- losses ---------------------------------------------------------------------------

    async def on_error(self, msg: RequestError) -> bool:
        """True: handled (a retriable error, now being retried; or about an attempt already given
        up, which no longer matters); False: the request fails with it."""
        attempt = self.attempts.get(msg.request_id)
        if attempt is None:
            return True
        if not msg.retriable:
            return False
        if msg.reason == "no_worker":
            attempt.retries += 1
            backoff = min(2.0, self.policy.retry_backoff_s * 2 ** min(attempt.retries - 1, 4))
            attempt.retry_at = time.monotonic() + backoff
            logger.info("request %s: no worker available; retrying in %.1f s", msg.request_id, backoff)
            return True
        await self.migrate(attempt, msg.reason or "worker_lost", msg.message)
        return True

    async def watch(self, now: float | None = None) -> None:
        """Deadline, lost workers, a restarted scheduler, retries that are due (at most every 0.2 s)."""
        now = time.monotonic() if now is None else now
        if now >= self.deadline:
            self.metrics.requests_failed_migration.labels("deadline").inc()
            logger.warning("request %s: no result within its %.0f s deadline", self.request_id,
                           self.policy.request_timeout_s)
            raise MigrationFailed(504, f"the request did not complete within {self.policy.request_timeout_s:g} s",
                                  "timeout")
        if now - self._checked_at < 0.2:
            return
        self._checked_at = now
        client = self.client
        for attempt in self.live():
            if attempt.retry_at is not None:
                if now >= attempt.retry_at and client.scheduler_alive:
                    attempt.retry_at = None
                    await self.migrate(attempt, "no_worker", "no worker was available")
                continue
            if attempt.instance_id:
                state = client.instance_state(attempt.instance_id, attempt.incarnation)
                if state == "dead":
                    await self.migrate(attempt, "worker_lost", f"worker {attempt.instance_id} is dead")
                elif state == "unlisted":
                    attempt.unlisted_since = attempt.unlisted_since or now
                    if now - attempt.unlisted_since > self.policy.unlisted_grace_s:
                        await self.migrate(attempt, "worker_lost", f"worker {attempt.instance_id} is gone")
                elif state == "listed":
                    attempt.unlisted_since = None
            elif not attempt.started and client.scheduler_alive and client.scheduler_id \
                    and attempt.epoch != client.scheduler_id:
                # Sent to a scheduler that is gone (or never sent): the submit may be lost.
                await self.migrate(attempt, "scheduler_restart", "the scheduler restarted")

    async def migrate(self, attempt: Attempt, reason: str, why: str) -> None:
        """Give `attempt` up and continue each of its unfinished choices as a new attempt."""
        if self.attempts.get(attempt.sub_id) is not attempt:
            return
        lost_at = attempt.lost_at if reason != "worker_lost" and attempt.lost_at is not None else time.monotonic()
        self.end(attempt)
        self.client.abort_soon(attempt.sub_id, f"migrated: {why}")  # in case it still runs somewhere
        if attempt.sampling.use_beam_search:
            await self._restart_beams(attempt, reason, why, lost_at)
            return
        for choice in attempt.choices:
            if not attempt.owns(choice) or choice.finish_reason is not None:
                continue
            if reason in COUNTED_REASONS:
                choice.migrations += 1
                if choice.migrations > self.policy.max_migrations:
                    self.metrics.requests_failed_migration.labels("limit").inc()
                    logger.warning("request %s: choice %d lost its worker %d times (last: %s); giving up",
                                   self.request_id, choice.index, choice.migrations, why)
                    raise MigrationFailed(
                        503, f"the request lost its worker {choice.migrations} times (last: {why}); "
                             f"giving up after {self.policy.max_migrations} migrations", "worker_lost")
            sampling = continuation_sampling(self.base_sampling, choice)
            self._counter += 1
            sub_id = f"{self.request_id}~{self._counter}"
            prompt = self.prompts[attempt.prompt_index] + list(choice.token_ids)
            choice.sub = sub_id
            if sampling is None:
                # Every token it may have is out, only its finish was lost: end it here.
                self.add(sub_id, attempt.prompt_index, prompt, attempt.sampling, [choice])
                self.stream.put(TokenDelta(request_id=sub_id, index=0, token_ids=[], logprobs=None,
                                           finish_reason="length", num_prompt_tokens=len(prompt),
                                           num_output_tokens=0))
                continue
            new = self.add(sub_id, attempt.prompt_index, prompt, sampling, [choice])
            new.lost_at, new.reason = lost_at, reason
            self.metrics.requests_migrated.labels(reason).inc()
            logger.info("request %s choice %d -> %s (%s: %s; %d tokens carried)", self.request_id, choice.index,
                        sub_id, reason, why, len(choice.token_ids))
            await self.submit(new)

    async def _restart_beams(self, attempt: Attempt, reason: str, why: str, lost_at: float) -> None:
        """A beam search streams nothing before its end, and its beams depend on each other: it
        starts over whole, as one new attempt with the same choice numbering."""
        unfinished = [c for c in attempt.choices if attempt.owns(c) and c.finish_reason is None]
        if not unfinished:
            return
        if reason in COUNTED_REASONS:
            for choice in unfinished:
                choice.migrations += 1
            if max(c.migrations for c in unfinished) > self.policy.max_migrations:
                self.metrics.requests_failed_migration.labels("limit").inc()
                raise MigrationFailed(
                    503, f"the beam search lost its worker too often (last: {why}); giving up after "
                         f"{self.policy.max_migrations} migrations", "worker_lost")
        self._counter += 1
        sub_id = f"{self.request_id}~{self._counter}"
        for choice in unfinished:
            choice.sub = sub_id
        new = self.add(sub_id, attempt.prompt_index, self.prompts[attempt.prompt_index], attempt.sampling,
                       attempt.choices)
        new.lost_at, new.reason = lost_at, reason
        self.metrics.requests_migrated.labels(reason).inc()
        logger.info("request %s: beam search -> %s (%s: %s), restarted whole", self.request_id, sub_id, reason, why)
        await self.submit(new)
