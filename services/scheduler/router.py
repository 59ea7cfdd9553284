"""Routing policy: which instance serves a new request.

Least loaded first, by (waiting + running) / capacity, where the scheduler's own count of
assigned-but-unfinished requests stands in for the heartbeat when it is higher (heartbeats are
0.5 s old at worst, and a burst of submissions must not all land on the same idle worker).
Ties go to the instance with more free KV pages, then to the one that was given fewer requests
so far (round robin among idle equals), then by id so the choice is deterministic.

With P/D disaggregation (`route`): a single-choice request goes to the prefill instance with
the least prefill work queued (reported queued prompt tokens plus what was sent since that
report), paired with up to three decode candidates ranked by batch load and free KV pages; the
prefill worker tries them in order. A mixed worker, when present and less loaded, takes the
request whole; so do requests with n > 1, and every request when either pool is empty.

Liveness: suspect instances are skipped while an alive one is left (`Instance.alive`).

Role flips: an instance is offered for the role its worker acknowledged, and for no role while a
flip ordered to it is unacknowledged (`Instance.offers`); its old role's pool loses it the moment
the flip is ordered, so no new Assign names it as a decode candidate it will refuse. Only when
every live instance is mid-flip does a request go (whole) to one of them: a flip never turns a
servable request into a 503.

Offline work (the report's latency-constrained decoupled placement): a single-choice offline
request whose best prefill instance is idle (nothing queued to prefill, nothing waiting) and runs
less than `OFFLINE_DECODE_SHARE` of its capacity stays there whole, its decode included, instead of
taking a slot on a decode instance that online sequences need; online prefill arriving there still
goes first (queued online work ends the placement, and the engine admits online before offline).

KV-aware routing: when some candidate holds part of the prompt's prefix (in its HBM pages, or
the kvstore holds it and any worker can reload it), candidates are ranked by cost = prompt
tokens left to compute + queued prefill tokens + a per-sequence charge for the batch already
running there. A repeated long prefix therefore goes where it is cached, while a busy holder
still loses to an idle worker once its queue outweighs the saving.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from common.protocol import WORKER_ROLES
from services.scheduler.registry import Instance

__all__ = ["Router", "Route", "load_key", "MAX_DECODE_CANDIDATES"]

MAX_DECODE_CANDIDATES = 3
# What one queued or running sequence costs a newcomer, in prompt tokens to compute: roughly
# the prefill tokens one step could have processed in the time a decode slot takes.
LOAD_TOKENS_PER_SEQUENCE = 64
# An idle prefill instance decodes offline requests itself up to this share of its batch capacity.
OFFLINE_DECODE_SHARE = 0.5


@dataclass
class Route:
    """Where a request goes: `prefill` runs it (whole, when `decode` is empty)."""

    prefill: Instance
    decode: list[Instance] = field(default_factory=list)


def load_key(instance: Instance) -> tuple[float, int, int, str]:
    """Sort key: smaller is a better target."""
    return (instance.load / instance.capacity, -instance.free_pages, instance.assigned_total, instance.instance_id)


def prefill_key(instance: Instance) -> tuple[int, float, int, str]:
    """Prefill instances: least queued prompt work first (what TTFT waits on)."""
    return (instance.queued_prefill_tokens, instance.load / instance.capacity, instance.assigned_total,
            instance.instance_id)


def decode_key(instance: Instance, prompt_len: int) -> tuple[bool, float, int, str]:
    """Decode instances: room for the sequence's KV first, then batch load, then free pages."""
    fits = instance.free_pages * max(1, instance.page_size) > prompt_len
    return (not fits, instance.load / instance.capacity, -instance.free_pages, instance.instance_id)


def idle_for_offline_decode(instance: Instance) -> bool:
    """A prefill instance with room to decode offline work itself (see the module docstring)."""
    return (instance.queued_prefill_tokens == 0 and instance.waiting == 0
            and instance.load < OFFLINE_DECODE_SHARE * instance.capacity)


def kv_cost(instance: Instance, prompt_len: int, cached: dict[str, int]) -> tuple[int, tuple]:
    """Smaller is better: tokens this request would wait on or compute at `instance`."""
    uncached = prompt_len - cached.get(instance.instance_id, 0)
    return (uncached + instance.queued_prefill_tokens + LOAD_TOKENS_PER_SEQUENCE * instance.load, load_key(instance))


class Router:
    def route(
        self, instances: Iterable[Instance], prompt_len: int = 0, n: int = 1, cached: dict[str, int] | None = None,
        priority: str = "online",
    ) -> Route | None:
        """Prefill instance and decode candidates for a request, or None if nobody can serve it.
        `cached`: prompt tokens each instance would find cached (from the global prefix index)."""
        # Encoders (role `encode`) serve encode jobs, never requests (`encode_pool`).
        live = [i for i in instances if not i.draining and i.role in WORKER_ROLES]
        # A suspect instance (silent, or maybe the peer whose socket just closed) gets no new
        # work while anyone alive is left; with nobody alive it still may (a slow heartbeat on
        # a loaded box is no reason to refuse every request).
        live = [i for i in live if i.alive] or live
        # Prefer instances whose context window fits the prompt; if none does, still route so
        # the worker answers with a clear 400 rather than the scheduler guessing at limits.
        live = [i for i in live if i.max_model_len > prompt_len] or live
        if not live:
            return None
        # Mid-flip instances serve nothing new, unless nothing else is left (then whole).
        settled = [i for i in live if i.pending_role is None] or live
        prefill = [i for i in settled if i.offers("prefill")]
        decode = [i for i in settled if i.offers("decode")]
        mixed = [i for i in settled if i.offers("mixed")]
        kv_aware = bool(cached) and any(cached.values())
        pick_prefill = (lambda i: kv_cost(i, prompt_len, cached)) if kv_aware else prefill_key
        pick_whole = (lambda i: kv_cost(i, prompt_len, cached)) if kv_aware else load_key
        if n == 1 and prefill and decode:
            chosen = min(prefill, key=pick_prefill)
            if priority == "offline" and idle_for_offline_decode(chosen):
                return Route(chosen)
            if mixed:
                best_mixed = min(mixed, key=pick_whole)
                if best_mixed.load / best_mixed.capacity < chosen.load / chosen.capacity:
                    return Route(best_mixed)
            ranked = sorted(decode, key=lambda i: decode_key(i, prompt_len))
            return Route(chosen, ranked[:MAX_DECODE_CANDIDATES])
        return Route(min(mixed or settled, key=pick_whole))
