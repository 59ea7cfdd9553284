"""One generation request's life on the gateway: admit, submit, turn token deltas into text, finish.

Shared by the chat and completions handlers, which only format what comes out of here. A request
with several prompts (completions batch) becomes one Submit per prompt; its choices are numbered
prompt-major (`prompt_index * n + i`), as OpenAI does. Each choice has its own incremental
detokenizer and stop-string matcher; a choice that hits a stop string is finished here and later
deltas for it are ignored; once every choice of a sub-request is finished, the sub-request is
aborted on the worker if it is still running there, so its KV pages are freed at once.

`close()` (always called, from a `finally`) aborts whatever is still running: that is how a
client that disconnects, or a handler cancelled for any reason, frees the worker.

What runs on the bus are *attempts* (`migration.Migrator`): at first one per prompt; a choice
whose worker is lost continues as an attempt of its own on another worker, and its deltas land
in the same choice, deduplicated by output position. Every request has a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from common.detokenizer import IncrementalDetokenizer
from common.engine.multimodal import ImageItem
from common.engine.sampling_params import SamplingParams
from common.image_frames import image_frames
from common.protocol import RequestError, Sampling
from common.stop_strings import StopStringMatcher
from services.gateway.client import RequestStream
from services.gateway.context import GatewayContext
from services.gateway.migration import SUBMIT_TIMEOUT_S, Attempt, MigrationFailed, Migrator
from services.gateway.openai_schema import APIError

logger = logging.getLogger(__name__)

__all__ = ["Generation", "ChoiceUpdate", "error_from_worker", "SUBMIT_TIMEOUT_S"]

# How often an idle stream checks its deadline and its workers' health (seconds).
WATCH_INTERVAL_S = 0.25


@dataclass(slots=True)
class ChoiceUpdate:
    """New output of one choice since the last update."""

    index: int
    text: str
    logprobs: list | None  # wire entries of the tokens in this update (only when requested)
    finish_reason: str | None


class _Choice:
    __slots__ = ("index", "prompt_index", "seed_index", "sub", "detok", "matcher", "finish_reason", "token_ids",
                 "worker_done", "migrations")

    def __init__(self, index: int, prompt_index: int, seed_index: int, sub: str, detok: IncrementalDetokenizer,
                 stops: list[str]) -> None:
        self.index = index
        self.prompt_index = prompt_index
        self.seed_index = seed_index  # its seed is the request's + this (as the engine numbers choices)
        self.sub = sub  # the attempt computing it now
        self.detok = detok
        self.matcher = StopStringMatcher(stops) if stops else None
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []  # output tokens received (and shown) so far
        self.worker_done = False
        self.migrations = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def error_from_worker(msg: RequestError) -> APIError:
    status = msg.code if 400 <= msg.code <= 599 else 500
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    code = "service_unavailable" if status == 503 else ("worker_error" if status >= 500 else "invalid_value")
    return APIError(status, msg.message, code=code, headers=headers)


class Generation:
    def __init__(self, ctx: GatewayContext, request_id: str, prompt_ids: list[list[int]], params: SamplingParams,
                 want_logprobs: bool, priority: str = "online",
                 images: list[list[ImageItem]] | None = None) -> None:
        self.ctx = ctx
        self.priority = priority
        self.request_id = request_id
        self.params = params
        self.prompt_ids = prompt_ids
        self.want_logprobs = want_logprobs
        self.prompt_tokens = sum(len(ids) for ids in prompt_ids)
        self.arrival = time.time()
        self.first_token_time: float | None = None
        n = params.n
        self.subs = [request_id] if len(prompt_ids) == 1 else [f"{request_id}-{i}" for i in range(len(prompt_ids))]
        tokenizer, skip = ctx.tokenizer, params.skip_special_tokens
        self.choices = [
            _Choice(p * n + i, p, i, sub, IncrementalDetokenizer(tokenizer, ids, skip), params.stop)
            for p, (sub, ids) in enumerate(zip(self.subs, prompt_ids))
            for i in range(n)
        ]
        self._unfinished = len(self.choices)
        self.stream = RequestStream()
        self.sampling = Sampling(**self.params.to_dict())  # the params were validated with the request
        frames = [image_frames(items) if items else None for items in images] if images else None
        self.migrator = Migrator(ctx.client, ctx.metrics, request_id, self.stream, self.arrival, priority,
                                 self.sampling.to_dict(), [list(ids) for ids in prompt_ids], frames)
        self._cached_tokens = [0] * len(prompt_ids)  # per prompt: its tokens a worker found in its prefix cache
        self._admitted = False
        self._closed = False
        self._failed = False
        self._state = "new"  # new -> waiting -> running

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.num_tokens for c in self.choices)

    # ---- start ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Admit and submit; raises APIError (429 / 503) without side effects left behind.

        A scheduler that answered before and is away now (restarting) is waited for, up to
        `scheduler_wait_s` and the deadline; a submit it does not take is retried by `updates`."""
        ctx = self.ctx
        ctx.admission.acquire()
        self._admitted = True
        await self._wait_until_ready()
        self._set_state("waiting")
        attempts = [self.migrator.add(sub, p, list(ids), self.sampling, [c for c in self.choices if c.sub == sub])
                    for p, (sub, ids) in enumerate(zip(self.subs, self.prompt_ids))]
        for attempt in attempts:
            await self.migrator.submit(attempt)

    async def _wait_until_ready(self) -> None:
        client = self.ctx.client
        if not client.ready and client.seen_scheduler:
            policy = client.migration
            limit = time.monotonic() + min(policy.scheduler_wait_s, policy.request_timeout_s)
            while not client.ready and time.monotonic() < limit:
                await asyncio.sleep(0.1)
        if not client.ready:
            raise APIError(503, "no worker is available to serve the request; retry shortly",
                           code="service_unavailable", headers={"Retry-After": "2"})

    # ---- the token stream -----------------------------------------------------------------

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Batches of choice updates until every choice is finished; worker errors, a request
        whose migrations ran out or whose deadline passed raise APIError."""
        try:
            while self._unfinished:
                batch = await self._next_batch()
                updates: list[ChoiceUpdate] = []
                for msg in batch:
                    if type(msg) is RequestError:
                        if await self.migrator.on_error(msg):
                            continue  # its choices go on elsewhere
                        self._failed = True
                        raise error_from_worker(msg)
                    self._apply(msg, updates)
                if self._unfinished:
                    await self.migrator.watch()
                if updates:
                    yield updates
        except MigrationFailed as failure:
            self._failed = True
            headers = {"Retry-After": "2"} if failure.status == 503 else None
            raise APIError(failure.status, failure.message, code=failure.code, headers=headers) from None

    async def _next_batch(self) -> list[Any]:
        """What arrived, or nothing after a watch interval (so deadlines and losses are checked)."""
        try:
            async with asyncio.timeout(WATCH_INTERVAL_S):
                return await self.stream.get_batch()
        except TimeoutError:
            return []

    def _apply(self, delta: Any, updates: list[ChoiceUpdate]) -> None:
        located = self.migrator.locate(delta)
        if located is None:
            logger.debug("delta for unknown or migrated choice %s/%s dropped", delta.request_id, delta.index)
            return
        attempt, choice = located
        self.migrator.note_delta(attempt, delta)
        p = attempt.prompt_index
        self._cached_tokens[p] = max(self._cached_tokens[p], min(delta.cached_tokens, len(self.prompt_ids[p])))
        token_ids, delta_logprobs = delta.token_ids, delta.logprobs
        # Deltas carry the choice's cumulative output count (counted from the tokens its attempt
        # started with): positions this gateway already has (two workers briefly decoding one
        # request after a KV hand-off raced a timeout, or a migrated attempt) are dropped, so the
        # client never sees a token twice.
        end = attempt.bases[delta.index] + delta.num_output_tokens
        start = end - len(token_ids)
        if delta.num_output_tokens > 0 and start < choice.num_tokens:
            skip = choice.num_tokens - start
            token_ids = token_ids[skip:]
            delta_logprobs = delta_logprobs[skip:] if delta_logprobs else delta_logprobs
            if not token_ids and delta.finish_reason is None:
                return
        elif delta.num_output_tokens > 0 and start > choice.num_tokens:
            # A gap can only come from a bug upstream: say so rather than stream a hole.
            logger.error("request %s choice %d: tokens %d..%d arrived after only %d", self.request_id,
                         choice.index, start, end, choice.num_tokens)
        if delta.finish_reason is not None:
            choice.worker_done = True
        if choice.finish_reason is not None:
            return  # already ended by a stop string: the rest of its tokens are not output
        if self.first_token_time is None:
            self.first_token_time = time.time()
            self.ctx.metrics.ttft.observe(self.first_token_time - self.arrival)
            self._set_state("running")
        choice.token_ids.extend(token_ids)
        text = choice.detok.push(token_ids)
        matcher = choice.matcher
        finish = delta.finish_reason
        if matcher is not None:
            text = matcher.feed(text) if text else ""
            if matcher.matched is not None:
                finish = "stop"
            elif finish is not None:
                text += matcher.feed(choice.detok.flush())
                text += matcher.flush()
                if matcher.matched is not None:
                    finish = "stop"
        elif finish is not None:
            text += choice.detok.flush()
        logprobs = delta_logprobs if self.want_logprobs else None
        if finish is not None:
            choice.finish_reason = finish
            self._unfinished -= 1
            if not self._end_attempt_if_done(attempt) and not choice.worker_done:
                # a stop string ended this choice while its siblings go on: stop just this one
                self.ctx.client.finish_choice_soon(attempt.sub_id, delta.index)
        if text or finish is not None or logprobs:
            updates.append(ChoiceUpdate(choice.index, text, logprobs, finish))

    def _end_attempt_if_done(self, attempt: Attempt) -> bool:
        """Close an attempt once all the choices it computes ended; returns whether it did."""
        choices = [c for c in attempt.choices if attempt.owns(c)]
        if not all(c.finish_reason is not None for c in choices):
            return False
        if not all(c.worker_done for c in choices):
            # a stop string ended it here: stop the worker too, freeing its pages now
            self.ctx.client.abort_soon(attempt.sub_id, "stop string")
        self.migrator.end(attempt)
        return True

    def _set_state(self, state: str) -> None:
        metrics = self.ctx.metrics
        if self._state == "waiting":
            metrics.waiting.dec()
        elif self._state == "running":
            metrics.running.dec()
        if state == "waiting":
            metrics.waiting.inc()
        elif state == "running":
            metrics.running.inc()
        self._state = state

    # ---- end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Always called once the handler is done with the request (idempotent).

        Whatever is still running on a worker at this point is unwanted: the client left, the
        handler was cancelled, or another part of the request failed.
        """
        if self._closed:
            return
        self._closed = True
        client = self.ctx.client
        submitted = self._state != "new"
        reason = "another part of the request failed" if self._failed else "client disconnected"
        for attempt in self.migrator.live():
            self.migrator.end(attempt)
            if submitted:
                client.abort_soon(attempt.sub_id, reason)
                logger.info("request %s aborted: %s", attempt.sub_id, reason)
        self._set_state("done")
        if self._admitted:
            self.ctx.admission.release()
        if submitted:
            unfinished = "error" if self._failed else "abort"
            reasons = [c.finish_reason or unfinished for c in self.choices]
            self.ctx.metrics.record_request(self.prompt_tokens, self.completion_tokens, reasons, self.arrival,
                                            self.first_token_time, time.time())

    def usage(self) -> dict[str, Any]:
        completion = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
                "prompt_tokens_details": {"cached_tokens": sum(self._cached_tokens)}}
