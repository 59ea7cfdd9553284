"""The scheduler's request table: which worker holds each request now, and what it was charged.

An entry follows its request from the prefill worker to the decode worker that took its KV over,
so aborts and failure handling reach whoever holds it. Routing charges a request's uncached prompt
tokens to its prefill instance's queue estimate until that instance's next heartbeat reports its
own count; the table takes the charge back when the prefill is over. Pure bookkeeping over the
registry: no sockets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from services.scheduler.registry import Instance, Registry

__all__ = ["RequestEntry", "RequestTable"]


@dataclass
class RequestEntry:
    request_id: str
    gateway_identity: bytes
    gateway_id: str
    tokens_addr: str
    instance_id: str  # the worker holding the request now
    submitted_at: float
    prompt_len: int = 0
    queued_prefill_tokens: int = 0  # on its prefill instance when it was routed (TTFT predictor input)
    decode_candidates: list[str] = field(default_factory=list)  # until handed over
    # Prompt tokens charged to the prefill instance's queue estimate until its next heartbeat.
    charge: int = 0
    charged_at_heartbeat: int = 0
    prefill_instance: str = ""
    max_tokens: int = 0  # as the request asked (0: not given); DP balance ranks sequences by it
    n: int = 1
    held_since: float = field(default_factory=time.monotonic)  # on its current instance


class RequestTable:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._entries: dict[str, RequestEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def get(self, request_id: str) -> RequestEntry | None:
        return self._entries.get(request_id)

    def entries(self) -> list[RequestEntry]:
        return list(self._entries.values())

    def add(self, instance: Instance, *, request_id: str, gateway_identity: bytes, gateway_id: str,
            tokens_addr: str, prompt_len: int, cached_tokens: int, decode_candidates: list[str],
            max_tokens: int = 0, n: int = 1) -> RequestEntry:
        """Record a request routed to `instance` and charge it the prompt tokens it must compute
        (a cached prefix costs the instance nothing)."""
        entry = RequestEntry(
            request_id, gateway_identity, gateway_id, tokens_addr, instance.instance_id, time.monotonic(),
            prompt_len=prompt_len, queued_prefill_tokens=instance.queued_prefill_tokens,
            decode_candidates=decode_candidates, charge=prompt_len - cached_tokens,
            charged_at_heartbeat=instance.heartbeats, prefill_instance=instance.instance_id,
            max_tokens=max_tokens, n=n,
        )
        self._entries[request_id] = entry
        self.registry.assign(instance.instance_id, request_id)
        instance.prefill_tokens_since_heartbeat += entry.charge
        return entry

    def finish(self, request_id: str, instance_id: str) -> RequestEntry | None:
        """The request ended on `instance_id`; None when that instance no longer holds it."""
        entry = self._entries.get(request_id)
        if entry is None or entry.instance_id != instance_id:
            return None
        del self._entries[request_id]
        self.registry.release(instance_id, request_id)
        self._uncharge(entry)
        return entry

    def abort(self, request_id: str) -> RequestEntry | None:
        """Forget an aborted request; returns its entry (None when unknown here)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            self.registry.release(entry.instance_id, request_id)
        return entry

    def hand_over(self, entry: RequestEntry, to_instance: str) -> None:
        """A decode worker took the request's KV (after prefill, or a DP-balance migration): it
        holds the request from now on."""
        self.registry.release(entry.instance_id, entry.request_id)
        self._uncharge(entry)
        entry.instance_id = to_instance
        entry.decode_candidates = []
        entry.held_since = time.monotonic()
        self.registry.assign(to_instance, entry.request_id)

    def take_requests_of(self, instance: Instance) -> list[RequestEntry]:
        """Remove and return every request `instance` held (it died, left or restarted)."""
        taken = []
        for request_id in sorted(instance.inflight):
            entry = self._entries.get(request_id)
            if entry is not None and entry.instance_id == instance.instance_id:
                del self._entries[request_id]
                taken.append(entry)
        instance.inflight.clear()
        return taken

    def _uncharge(self, entry: RequestEntry) -> None:
        """Its prefill is done: take its tokens off the queue estimate, unless a heartbeat since
        the assignment already replaced the estimate with the instance's own count."""
        instance = self.registry.get(entry.prefill_instance)
        if instance is not None and instance.heartbeats == entry.charged_at_heartbeat and entry.charge:
            instance.prefill_tokens_since_heartbeat = max(0, instance.prefill_tokens_since_heartbeat - entry.charge)
            entry.charge = 0
