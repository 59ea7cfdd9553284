"""The instance registry: who is registered, their last reported load, and who went silent.

Pure bookkeeping (no sockets, an injectable clock) so the policy is unit-testable. An instance
is identified by its `instance_id`; the bus identity of its DEALER is unique per process
incarnation, which tells a worker that re-sends Register (same identity: nothing lost) from a
restarted worker under the same id (new identity: the old incarnation's requests are gone).

An instance's role is what the worker itself said it is (Register, FlipAck, heartbeat); a flip the
scheduler ordered and the worker has not answered is `pending_role`, never mixed up with it, so
the router can offer the instance for neither role while the flip is in flight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from common.protocol import WORKER_ROLES, Heartbeat, Register

__all__ = ["Instance", "Registry", "RegisterOutcome", "DEFAULT_HEARTBEAT_TIMEOUT_S"]

# An instance silent for this long is dead (heartbeats come every 0.5 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 3.0


@dataclass
class Instance:
    instance_id: str
    identity: bytes
    role: str  # as the worker last acknowledged or reported it
    kv_addr: str
    num_pages: int
    page_size: int
    model: str
    max_model_len: int
    registered_at: float
    last_heartbeat: float
    # Load as last reported by the instance itself (typed Heartbeat fields: routing reads these).
    waiting: int = 0
    running: int = 0
    free_pages: int = 0
    total_pages: int = 0
    used_pages: int = 0
    prefix_hit_rate: float = 0.0
    reported_queued_prefill_tokens: int = 0
    max_num_seqs: int = 0  # 0 until the first heartbeat says
    draining: bool = False
    flipping: bool = False
    kv_namespace: str = ""  # "" until the first heartbeat says: no prefix-cache matching yet
    # The instance's free-form report, shown on the status page; nothing routes on it.
    stats: dict = field(default_factory=dict)
    # Requests the scheduler assigned and has not seen finish: fresher than the heartbeat
    # between two heartbeats, so back-to-back submissions spread out.
    inflight: set[str] = field(default_factory=set)
    assigned_total: int = 0
    heartbeats: int = 0
    # Prompt tokens routed here for prefill since the last heartbeat (not in its report yet).
    prefill_tokens_since_heartbeat: int = 0
    # A flip the scheduler ordered and the worker has not acknowledged (its id and role): until
    # the FlipAck (or a heartbeat answering that id) the instance is offered for neither role,
    # and heartbeats sent before the worker saw the order cannot undo it.
    pending_flip: int | None = None
    pending_role: str | None = None
    # The last flip the worker acknowledged (0: none), its "flip generation": a decode candidate
    # carries it, so the worker can tell a hand-off promised before its latest flip.
    flip_id: int = 0

    @property
    def queued_prefill_tokens(self) -> int:
        return self.reported_queued_prefill_tokens + self.prefill_tokens_since_heartbeat

    @property
    def capacity(self) -> int:
        """Sequences the instance can run at once (1 until a heartbeat reports it)."""
        return self.max_num_seqs if self.max_num_seqs > 0 else 1

    @property
    def ordered_role(self) -> str:
        """The role the scheduler means it to have: the pending one while a flip is in flight."""
        return self.pending_role if self.pending_role is not None else self.role

    def offers(self, role: str) -> bool:
        """Whether new work of `role` may be routed here: it acknowledged that role, no flip is
        in flight (nor is it draining)."""
        return not self.draining and self.pending_role is None and self.role == role

    def acknowledge(self, flip_id: int, role: str) -> bool:
        """The worker answered flip `flip_id` with `role` (a FlipAck, or a heartbeat carrying it);
        True when that settles the pending flip. An answer older than one already seen is ignored."""
        if flip_id < self.flip_id:
            return False
        self.flip_id, self.role = flip_id, role
        if self.pending_flip is not None and flip_id >= self.pending_flip:
            self.pending_flip = self.pending_role = None
            return True
        return False

    @property
    def load(self) -> int:
        reported = self.waiting + self.running
        return max(reported, len(self.inflight))

    def describe(self, now: float) -> dict:
        """One entry of a StatusReply (plain msgpack-able values)."""
        return {
            "id": self.instance_id,
            "role": self.role,  # acknowledged by the worker
            # "flipping": ordered into `pending_role` and not acknowledged yet (no new work is
            # routed here meanwhile), or acknowledged with no work of the new role started yet.
            "state": "draining" if self.draining else ("flipping" if self.pending_flip is not None
                                                        or self.flipping else "ready"),
            "pending_role": self.pending_role,
            "flip_id": self.flip_id,
            "ready": not self.draining,  # registered means the engine is loaded
            "waiting": self.waiting,
            "running": self.running,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "free_pages": self.free_pages,
            "total_pages": self.total_pages,
            "used_pages": self.used_pages,
            "prefix_hit_rate": self.prefix_hit_rate,
            "last_heartbeat_age": round(now - self.last_heartbeat, 3),
            "inflight": len(self.inflight),
            "assigned_total": self.assigned_total,
            "model": self.model,
            "max_model_len": self.max_model_len,
            "page_size": self.page_size,
            "kv_addr": self.kv_addr,
            "stats": self.stats,
        }


class RegisterOutcome(Enum):
    NEW = "new"  # first registration of this id
    REFRESHED = "refreshed"  # the same process registered again (e.g. a lost ack)
    REPLACED = "replaced"  # a new process took over the id: the old one's requests are lost


class Registry:
    def __init__(
        self,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.clock = clock
        self._instances: dict[str, Instance] = {}
        self._by_identity: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._instances)

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._instances

    def get(self, instance_id: str) -> Instance | None:
        return self._instances.get(instance_id)

    def by_identity(self, identity: bytes) -> Instance | None:
        instance_id = self._by_identity.get(identity)
        return self._instances.get(instance_id) if instance_id is not None else None

    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    # ---- membership -------------------------------------------------------------------

    def register(self, identity: bytes, msg: Register) -> tuple[RegisterOutcome, Instance, Instance | None]:
        """Add or refresh an instance. Returns (outcome, instance, replaced old incarnation)."""
        now = self.clock()
        old = self._instances.get(msg.instance_id)
        if old is not None and old.identity == identity:
            old.kv_addr, old.model = msg.kv_addr, msg.model
            old.acknowledge(msg.flip_id, msg.role)
            old.num_pages, old.page_size, old.max_model_len = msg.num_pages, msg.page_size, msg.max_model_len
            old.last_heartbeat = now
            return RegisterOutcome.REFRESHED, old, None
        if old is not None:
            self._by_identity.pop(old.identity, None)
        stale_id = self._by_identity.pop(identity, None)
        if stale_id is not None and stale_id != msg.instance_id:
            # One process renaming itself: keep the table consistent, drop the old name.
            self._instances.pop(stale_id, None)
        instance = Instance(
            instance_id=msg.instance_id, identity=identity, role=msg.role, kv_addr=msg.kv_addr,
            num_pages=msg.num_pages, page_size=msg.page_size, model=msg.model,
            max_model_len=msg.max_model_len, registered_at=now, last_heartbeat=now,
            free_pages=msg.num_pages, total_pages=msg.num_pages, flip_id=msg.flip_id,
        )
        self._instances[msg.instance_id] = instance
        self._by_identity[identity] = msg.instance_id
        if old is not None:
            return RegisterOutcome.REPLACED, instance, old
        return RegisterOutcome.NEW, instance, None

    def heartbeat(self, identity: bytes, msg: Heartbeat) -> Instance | None:
        """Record a heartbeat; None when the sender is not (or no longer) registered."""
        instance = self.by_identity(identity)
        if instance is None or instance.instance_id != msg.instance_id:
            return None
        instance.last_heartbeat = self.clock()
        instance.heartbeats += 1
        # The heartbeat answers the flips up to its flip_id: one sent before the worker saw the
        # pending order carries an older id and leaves the order pending.
        instance.acknowledge(msg.flip_id, msg.role)
        instance.prefill_tokens_since_heartbeat = 0
        instance.waiting, instance.running = msg.waiting, msg.running
        instance.free_pages, instance.total_pages, instance.used_pages = msg.free_pages, msg.total_pages, msg.used_pages
        instance.prefix_hit_rate = msg.prefix_hit_rate
        instance.reported_queued_prefill_tokens = msg.queued_prefill_tokens
        instance.max_num_seqs = msg.max_num_seqs
        instance.draining, instance.flipping = msg.draining, msg.flipping
        instance.kv_namespace = msg.kv_namespace
        instance.stats = msg.stats
        return instance

    def remove(self, instance_id: str) -> Instance | None:
        instance = self._instances.pop(instance_id, None)
        if instance is not None:
            self._by_identity.pop(instance.identity, None)
        return instance

    def deregister(self, identity: bytes, instance_id: str) -> Instance | None:
        """Remove an instance leaving cleanly; only its own process may do so."""
        instance = self._instances.get(instance_id)
        if instance is None or instance.identity != identity:
            return None
        return self.remove(instance_id)

    def expire(self) -> list[Instance]:
        """Remove and return every instance silent for longer than the timeout."""
        now = self.clock()
        dead = [i for i in self._instances.values() if now - i.last_heartbeat > self.heartbeat_timeout_s]
        for instance in dead:
            self.remove(instance.instance_id)
        return dead

    # ---- request bookkeeping ----------------------------------------------------------

    def assign(self, instance_id: str, request_id: str) -> None:
        instance = self._instances.get(instance_id)
        if instance is not None:
            instance.inflight.add(request_id)
            instance.assigned_total += 1

    def release(self, instance_id: str, request_id: str) -> None:
        instance = self._instances.get(instance_id)
        if instance is not None:
            instance.inflight.discard(request_id)

    def workers(self, expected: int | None) -> dict:
        """How much of the layout serves: `/health`, `xllm serve`'s "ready" line and benchmarks
        wait on `up` reaching `expected` (None: no count was configured, nothing to wait for)."""
        # Up: registered (its engine is loaded), not draining, no flip in flight, i.e. new work
        # of the role it acknowledged may be routed to it now. Not up: not registered yet, gone
        # (left, or silent past the heartbeat timeout: removed), draining, or mid-flip.
        up = [i for i in self._instances.values()
              if i.role in WORKER_ROLES and not i.draining and i.pending_role is None]
        return {"expected": expected, "up": len(up),
                "by_role": {role: sum(1 for i in up if i.role == role) for role in WORKER_ROLES}}

    def describe(self) -> list[dict]:
        now = self.clock()
        return [instance.describe(now) for instance in sorted(self._instances.values(), key=lambda i: i.instance_id)]
