"""Routing policy: which instance serves a new request.

Least loaded first, by (waiting + running) / capacity, where the scheduler's own count of
assigned-but-unfinished requests stands in for the heartbeat when it is higher (heartbeats are
0.5 s old at worst, and a burst of submissions must not all land on the same idle worker).
Ties go to the instance with more free KV pages, then to the one that was given fewer requests
so far (round robin among idle equals), then by id so the choice is deterministic.

Every worker is a mixed worker for now (prefill and decode on one engine), so one instance
serves the whole request whatever its recorded role; P/D pairing comes with KV transfer.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.scheduler.registry import Instance

__all__ = ["Router", "load_key"]


def load_key(instance: Instance) -> tuple[float, int, int, str]:
    """Sort key: smaller is a better target."""
    return (instance.load / instance.capacity, -instance.free_pages, instance.assigned_total, instance.instance_id)


class Router:
    def choose(self, instances: Iterable[Instance], prompt_len: int = 0) -> Instance | None:
        """The instance to assign a request of `prompt_len` tokens to, or None if there is none."""
        candidates = [i for i in instances if not i.stats.get("draining")]
        if not candidates:
            return None
        # Prefer instances whose context window fits the prompt; if none does, still route so
        # the worker answers with a clear 400 rather than the scheduler guessing at limits.
        fitting = [i for i in candidates if i.max_model_len > prompt_len]
        return min(fitting or candidates, key=load_key)
