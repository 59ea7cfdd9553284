"""One generation request's life on the gateway: admit, submit, turn token deltas into text, finish.

Shared by the chat and completions handlers, which only format what comes out of here. A request
with several prompts (completions batch) becomes one Submit per prompt; its choices are numbered
prompt-major (`prompt_index * n + i`), as OpenAI does. Each choice has its own incremental
detokenizer and stop-string matcher; a choice that hits a stop string is finished here and later
deltas for it are ignored; once every choice of a sub-request is finished, the sub-request is
aborted on the worker if it is still running there, so its KV pages are freed at once.

`close()` (always called, from a `finally`) aborts whatever is still running: that is how a
client that disconnects, or a handler cancelled for any reason, frees the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from common.detokenizer import IncrementalDetokenizer
from common.engine.sampling_params import SamplingParams
from common.protocol import RequestError, Sampling
from common.stop_strings import StopStringMatcher
from services.gateway.client import RequestStream
from services.gateway.context import GatewayContext
from services.gateway.openai_schema import APIError

logger = logging.getLogger(__name__)

SUBMIT_TIMEOUT_S = 5.0


@dataclass(slots=True)
class ChoiceUpdate:
    """New output of one choice since the last update."""

    index: int
    text: str
    logprobs: list | None  # wire entries of the tokens in this update (only when requested)
    finish_reason: str | None


class _Choice:
    __slots__ = ("index", "sub", "detok", "matcher", "finish_reason", "num_tokens", "worker_done")

    def __init__(self, index: int, sub: str, detok: IncrementalDetokenizer, stops: list[str]) -> None:
        self.index = index
        self.sub = sub
        self.detok = detok
        self.matcher = StopStringMatcher(stops) if stops else None
        self.finish_reason: str | None = None
        self.num_tokens = 0
        self.worker_done = False


def error_from_worker(msg: RequestError) -> APIError:
    status = msg.code if 400 <= msg.code <= 599 else 500
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    code = "service_unavailable" if status == 503 else ("worker_error" if status >= 500 else "invalid_value")
    return APIError(status, msg.message, code=code, headers=headers)


class Generation:
    def __init__(self, ctx: GatewayContext, request_id: str, prompt_ids: list[list[int]], params: SamplingParams,
                 want_logprobs: bool, priority: str = "online") -> None:
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
        self._offsets = {sub: i * n for i, sub in enumerate(self.subs)}
        tokenizer, skip = ctx.tokenizer, params.skip_special_tokens
        self.choices = [
            _Choice(p * n + i, sub, IncrementalDetokenizer(tokenizer, ids, skip), params.stop)
            for p, (sub, ids) in enumerate(zip(self.subs, prompt_ids))
            for i in range(n)
        ]
        self._unfinished = len(self.choices)
        self._live_subs = set(self.subs)  # submitted and possibly still running on a worker
        self.stream = RequestStream()
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
        """Admit and submit; raises APIError (429 / 503) without side effects left behind."""
        ctx = self.ctx
        ctx.admission.acquire()
        self._admitted = True
        if not ctx.client.ready:
            raise APIError(503, "no worker is available to serve the request; retry shortly",
                           code="service_unavailable", headers={"Retry-After": "2"})
        for sub in self.subs:
            ctx.client.register(sub, self.stream)
        self._set_state("waiting")
        sampling = Sampling(**self.params.to_dict())  # the params were validated with the request
        for sub, ids in zip(self.subs, self.prompt_ids):
            try:
                async with asyncio.timeout(SUBMIT_TIMEOUT_S):  # (not wait_for: see client._status_loop)
                    await ctx.client.submit(sub, ids, sampling, self.arrival, self.priority)
            except TimeoutError:
                raise APIError(503, "the scheduler is not accepting requests; retry shortly",
                               code="service_unavailable", headers={"Retry-After": "2"}) from None

    # ---- the token stream -----------------------------------------------------------------

    async def updates(self) -> AsyncIterator[list[ChoiceUpdate]]:
        """Batches of choice updates until every choice is finished; worker errors raise APIError."""
        while self._unfinished:
            batch = await self.stream.get_batch()
            updates: list[ChoiceUpdate] = []
            for msg in batch:
                if type(msg) is RequestError:
                    self._live_subs.discard(msg.request_id)
                    self._failed = True
                    raise error_from_worker(msg)
                self._apply(msg, updates)
            if updates:
                yield updates

    def _apply(self, delta: Any, updates: list[ChoiceUpdate]) -> None:
        offset = self._offsets.get(delta.request_id)
        position = -1 if offset is None else offset + delta.index
        if not 0 <= position < len(self.choices) or self.choices[position].sub != delta.request_id:
            logger.warning("delta for unknown choice %s/%s dropped", delta.request_id, delta.index)
            return
        choice = self.choices[position]
        token_ids, delta_logprobs = delta.token_ids, delta.logprobs
        # Deltas carry the choice's cumulative output count: positions this gateway already has
        # (two workers briefly decoding one request after a KV hand-off raced a timeout) are
        # dropped, so the client never sees a token twice.
        start = delta.num_output_tokens - len(token_ids)
        if delta.num_output_tokens > 0 and start < choice.num_tokens:
            skip = choice.num_tokens - start
            token_ids = token_ids[skip:]
            delta_logprobs = delta_logprobs[skip:] if delta_logprobs else delta_logprobs
            if not token_ids and delta.finish_reason is None:
                return
        if delta.finish_reason is not None:
            choice.worker_done = True
        if choice.finish_reason is not None:
            return  # already ended by a stop string: the rest of its tokens are not output
        if self.first_token_time is None:
            self.first_token_time = time.time()
            self.ctx.metrics.ttft.observe(self.first_token_time - self.arrival)
            self._set_state("running")
        choice.num_tokens += len(token_ids)
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
            if not self._end_sub_if_done(choice.sub) and not choice.worker_done:
                # a stop string ended this choice while its siblings go on: stop just this one
                self.ctx.client.finish_choice_soon(choice.sub, delta.index)
        if text or finish is not None or logprobs:
            updates.append(ChoiceUpdate(choice.index, text, logprobs, finish))

    def _end_sub_if_done(self, sub: str) -> bool:
        """Close a submitted request once all its choices ended; returns whether it did."""
        choices = [c for c in self.choices if c.sub == sub]
        if not all(c.finish_reason is not None for c in choices):
            return False
        if not all(c.worker_done for c in choices):
            # a stop string ended it here: stop the worker too, freeing its pages now
            self.ctx.client.abort_soon(sub, "stop string")
        self._live_subs.discard(sub)
        self.ctx.client.unregister(sub)
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
        reason = "another prompt of the request failed" if self._failed else "client disconnected"
        for sub in self.subs:
            client.unregister(sub)
        for sub in self._live_subs if submitted else ():
            client.abort_soon(sub, reason)
            logger.info("request %s aborted: %s", sub, reason)
        self._live_subs.clear()
        self._set_state("done")
        if self._admitted:
            self.ctx.admission.release()
        if submitted:
            unfinished = "error" if self._failed else "abort"
            reasons = [c.finish_reason or unfinished for c in self.choices]
            self.ctx.metrics.record_request(self.prompt_tokens, self.completion_tokens, reasons, self.arrival,
                                            self.first_token_time, time.time())

    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}
