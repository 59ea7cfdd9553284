"""The instance registry: who is registered, their last reported load, and who went silent.

Pure bookkeeping (no sockets, an injectable clock) so the policy is unit-testable. An instance
is identified by its `instance_id`; the bus identity of its DEALER is unique per process
incarnation, which tells a worker that re-sends Register (same identity: nothing lost) from a
restarted worker under the same id (new identity: the old incarnation's requests are gone).

An instance's role is what the worker itself said it is (Register, FlipAck, heartbeat); a flip the
scheduler ordered and the worker has not answered is `pending_role`, never mixed up with it, so
the router can offer the instance for neither role while the flip is in flight.

Liveness (`tick`, `mark_suspect`, `kill`): an instance is alive, suspect (silent past
`suspect_after_s`, or possibly the peer whose socket just closed: no new work, nothing taken
from it) or dead (silent past the heartbeat timeout, or a definite signal: its process is gone,
or a new incarnation registered under its id). A heartbeat makes a suspect alive again; a dead
instance is removed and remembered for a while (`dead_instances`, shown in the status) so a
gateway can tell that the worker streaming one of its choices is gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from common.protocol import WORKER_ROLES, Heartbeat, Register

__all__ = ["Instance", "Registry", "RegisterOutcome", "DEFAULT_HEARTBEAT_TIMEOUT_S", "DEFAULT_SUSPECT_AFTER_S"]

# An instance silent for this long is dead (heartbeats come every 0.5 s).
DEFAULT_HEARTBEAT_TIMEOUT_S = 3.0
# Silent for this long (three missed heartbeats): suspect, no new work until it speaks again.
DEFAULT_SUSPECT_AFTER_S = 1.5
# How long a dead instance stays listed in the status (and how many are kept).
DEAD_LISTED_S = 120.0
DEAD_LISTED_MAX = 64


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
    incarnation: str = ""  # the worker process's random token (Register)
    pid: int = 0
    colocated_with: str = ""  # an encoder's worker sharing its device (ED-P); empty: standalone
    # "alive" or "suspect" (a dead instance is no longer in the registry) and since when.
    liveness: str = "alive"
    suspect_since: float | None = None
    suspect_reason: str = ""

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

    @property
    def alive(self) -> bool:
        return self.liveness == "alive"

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
            "state": "suspect" if not self.alive else (
                "draining" if self.draining else ("flipping" if self.pending_flip is not None
                                                  or self.flipping else "ready")),
            "liveness": self.liveness,
            "suspect_for": round(now - self.suspect_since, 3) if self.suspect_since is not None else None,
            "incarnation": self.incarnation,
            "pending_role": self.pending_role,
            "flip_id": self.flip_id,
            "ready": not self.draining and self.alive,  # registered means the engine is loaded
            "waiting": self.waiting,
            "running": self.running,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "free_pages": self.free_pages,
            "total_pages": self.total_pages,
            "used_pages": self.used_pages,
            "prefix_hit_rate": self.prefix_hit_rate,
            "last_heartbeat_age": round(now - self.last_heartbeat, 3),
            "inflight": len(self.inflight),
            "requests": sorted(self.inflight)[:64],  # which requests it holds (operators, chaos tests)
            "assigned_total": self.assigned_total,
            "model": self.model,
            "max_model_len": self.max_model_len,
            "page_size": self.page_size,
            "kv_addr": self.kv_addr,
            "colocated_with": self.colocated_with,
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
        suspect_after_s: float = DEFAULT_SUSPECT_AFTER_S,
    ) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.suspect_after_s = min(suspect_after_s, heartbeat_timeout_s)
        self.clock = clock
        self._instances: dict[str, Instance] = {}
        self._by_identity: dict[bytes, str] = {}
        # instance id -> what the status says of a dead one (its incarnation, when, why)
        self._dead: dict[str, dict] = {}
        # When a backend connection closed that could not be tied to an instance (tcp://).
        self._unattributed_disconnect: float | None = None

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
            old.pid = msg.pid or old.pid
            old.last_heartbeat = now
            self._revive(old)
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
            incarnation=msg.incarnation, pid=msg.pid, colocated_with=msg.colocated_with,
        )
        self._instances[msg.instance_id] = instance
        self._by_identity[identity] = msg.instance_id
        if old is not None:
            # A new incarnation is the definite news that the old one is dead.
            self._bury(old, "replaced by a new incarnation")
            return RegisterOutcome.REPLACED, instance, old
        return RegisterOutcome.NEW, instance, None

    def heartbeat(self, identity: bytes, msg: Heartbeat) -> Instance | None:
        """Record a heartbeat; None when the sender is not (or no longer) registered."""
        instance = self.by_identity(identity)
        if instance is None or instance.instance_id != msg.instance_id:
            return None
        instance.last_heartbeat = self.clock()
        instance.heartbeats += 1
        self._revive(instance)
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
        return self.tick()[1]

    def tick(self) -> tuple[list[Instance], list[Instance]]:
        """Apply the silence timings: (instances that just became suspect, dead ones removed)."""
        now = self.clock()
        suspects: list[Instance] = []
        dead: list[Instance] = []
        closed_at = self._unattributed_disconnect
        # After an unattributed disconnect, whoever stays silent for half the suspect window
        # past it is likely the peer that left (heartbeats come every 0.5 s).
        probe_over = closed_at is not None and now - closed_at > self.suspect_after_s / 2
        for instance in list(self._instances.values()):
            silent = now - instance.last_heartbeat
            if silent > self.heartbeat_timeout_s:
                self.kill(instance, f"no heartbeat for {silent:.1f} s")
                dead.append(instance)
            elif silent > self.suspect_after_s and self.mark_suspect(instance, f"no heartbeat for {silent:.1f} s"):
                suspects.append(instance)
            elif (probe_over and closed_at is not None and instance.last_heartbeat < closed_at
                  and self.mark_suspect(instance, "silent since a backend connection closed")):
                suspects.append(instance)
        if probe_over:
            self._unattributed_disconnect = None
        return suspects, dead

    def note_unattributed_disconnect(self) -> None:
        """A backend connection closed and nobody knows whose: probe everyone (see `tick`)."""
        self._unattributed_disconnect = self.clock()

    def mark_suspect(self, instance: Instance, reason: str) -> bool:
        """No new work for `instance` until it speaks again; True when it was alive."""
        if instance.liveness != "alive" or instance.instance_id not in self._instances:
            return False
        instance.liveness, instance.suspect_since, instance.suspect_reason = "suspect", self.clock(), reason
        return True

    def kill(self, instance: Instance, reason: str) -> bool:
        """Declare `instance` dead (remove it, list it as dead); True when it was registered."""
        if self._instances.get(instance.instance_id) is not instance:
            return False
        self.remove(instance.instance_id)
        self._bury(instance, reason)
        return True

    def by_pid(self, pid: int) -> Instance | None:
        return next((i for i in self._instances.values() if pid and i.pid == pid), None)

    def orphans_of(self, instance: Instance) -> list[str]:
        """A process declared dead that registers again (it was only silent): the requests it
        held were migrated elsewhere, so it must drop them. Returns their ids (once)."""
        record = self._dead.get(instance.instance_id)
        if record is None or not instance.incarnation or record["incarnation"] != instance.incarnation:
            return []
        del self._dead[instance.instance_id]
        return record["requests"]

    def dead_instances(self) -> list[dict]:
        """Instances declared dead lately, newest last (the gateways migrate their streams)."""
        now = self.clock()
        for instance_id in [k for k, v in self._dead.items() if now - v["died_at"] > DEAD_LISTED_S]:
            del self._dead[instance_id]
        return [{"id": v["id"], "incarnation": v["incarnation"], "reason": v["reason"],
                 "dead_for": round(now - v["died_at"], 3)} for v in self._dead.values()]

    def _bury(self, instance: Instance, reason: str) -> None:
        self._dead.pop(instance.instance_id, None)
        self._dead[instance.instance_id] = {"id": instance.instance_id, "incarnation": instance.incarnation,
                                            "reason": reason, "died_at": self.clock(),
                                            "requests": sorted(instance.inflight)}
        while len(self._dead) > DEAD_LISTED_MAX:
            del self._dead[next(iter(self._dead))]

    @staticmethod
    def _revive(instance: Instance) -> None:
        instance.liveness, instance.suspect_since, instance.suspect_reason = "alive", None, ""

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
              if i.role in WORKER_ROLES and not i.draining and i.pending_role is None and i.alive]
        return {"expected": expected, "up": len(up),
                "by_role": {role: sum(1 for i in up if i.role == role) for role in WORKER_ROLES}}

    def describe(self) -> list[dict]:
        now = self.clock()
        return [instance.describe(now) for instance in sorted(self._instances.values(), key=lambda i: i.instance_id)]
