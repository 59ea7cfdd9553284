"""A worker's role and the bookkeeping of role flips.

A flip changes what new work the worker takes, never what it already runs: a decode worker
turned prefill finishes its running decodes while it already prefills. The time from the flip
message to the first piece of work in the new role (a prefill for `prefill`, a sequence whose
KV landed for `decode`, either for `mixed`) is the flip latency, reported in heartbeats and
exported in `/metrics`.

A flip never breaks a promise already made either: a hand-off whose decode candidate was named
before the latest flip (its `flip_id`, the generation the scheduler knew, is older) is still taken
in after a flip out of the decode role (`named_before_latest_flip`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.protocol import WORKER_ROLES

__all__ = ["ROLES", "RoleState"]

ROLES = WORKER_ROLES  # the bus names them (common.protocol)
# A flip with no work of the new role for this long is settled anyway: it must not keep the
# PD policy (which waits for settling flips) frozen on an idle system.
SETTLE_LIMIT_S = 30.0


class RoleState:
    def __init__(self, role: str, clock: Callable[[], float] = time.monotonic) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.role = role
        self.clock = clock
        self.flips_total = 0
        self.last_flip_id = 0  # flip ids start at 1 and grow (services/scheduler/role_flips.py)
        self.last_flip_latency_s = -1.0
        self._flipped_at: float | None = None  # set until the first work in the new role

    @property
    def settling(self) -> bool:
        """A flip happened and no work of the new role arrived yet (for at most SETTLE_LIMIT_S)."""
        return self._flipped_at is not None and self.clock() - self._flipped_at < SETTLE_LIMIT_S

    def flip(self, role: str, flip_id: int) -> bool:
        """Apply a flip order; False when it is a repeat of one already applied (same id)."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if flip_id == self.last_flip_id:
            return False
        self.last_flip_id = flip_id
        if role != self.role:
            self.role = role
            self.flips_total += 1
            self._flipped_at = self.clock()
        return True

    def takes_decode_work(self) -> bool:
        return self.role in ("decode", "mixed")

    def named_before_latest_flip(self, flip_id: int | None) -> bool:
        """Whether something named at flip generation `flip_id` predates the latest flip applied
        here (None: not named by the scheduler at all, so not a promise)."""
        return flip_id is not None and flip_id < self.last_flip_id

    def started(self, kind: str) -> None:
        """Work of `kind` ("prefill" or "decode") began here; closes a pending flip's clock."""
        if self._flipped_at is not None and (self.role == kind or self.role == "mixed"):
            self.last_flip_latency_s = self.clock() - self._flipped_at
            self._flipped_at = None

    def stats(self) -> dict[str, float | int | bool]:
        return {
            "flips_total": self.flips_total,
            "last_flip_latency_s": round(self.last_flip_latency_s, 4),
            "flipping": self.settling,
        }
