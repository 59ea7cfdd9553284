"""How much offline (batch) work may run beside the online traffic, decided continuously.

Online and offline sequences share every decode step of a worker, so the time an offline line
takes per generated token is the step time the online requests see as their TPOT. The throttle
watches that signal and the online load:

- offline lines never hold more than `max_slots` requests in flight, and give up one slot for
  every online request in flight at this gateway (online work arriving takes the room back at
  once, before any latency is lost; the engine also preempts offline sequences for online ones);
- each finished offline line reports its seconds per output token; above `tpot_target_s` the
  slot budget is halved, below it grows by one (AIMD, as TCP does with a congestion window), so
  offline work fills the troughs without pushing the shared step time past the target.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["OfflineThrottle"]


class OfflineThrottle:
    def __init__(self, max_slots: int, tpot_target_s: float, online_in_flight: Callable[[], int],
                 *, poll_s: float = 0.05) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        self.max_slots = max_slots
        self.tpot_target_s = tpot_target_s
        self.online_in_flight = online_in_flight
        self.poll_s = poll_s
        self.window = float(max_slots)  # the AIMD budget, before the online load is taken off
        self.in_flight = 0
        self.decreases = 0
        self._last_decrease = 0.0

    @property
    def slots(self) -> int:
        """Offline requests allowed in flight right now (at least one while nothing online runs)."""
        room = int(self.window) - self.online_in_flight()
        return max(room, 0 if self.online_in_flight() else 1)

    async def acquire(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Wait for a slot; False (and no slot taken) once `stop()` says to give up."""
        while self.in_flight >= self.slots:
            if stop():
                return False
            await asyncio.sleep(self.poll_s)
        if stop():
            return False
        self.in_flight += 1
        return True

    def release(self, seconds_per_token: float | None) -> None:
        self.in_flight -= 1
        if seconds_per_token is None:
            return
        now = time.monotonic()
        if seconds_per_token > self.tpot_target_s:
            # one halving per round trip of the signal, not one per finished line
            if now - self._last_decrease > max(1.0, seconds_per_token * 4):
                self.window = max(1.0, self.window / 2)
                self.decreases += 1
                self._last_decrease = now
        else:
            self.window = min(float(self.max_slots), self.window + 1.0 / max(1.0, self.window))

    def describe(self) -> dict:
        return {"window": round(self.window, 2), "slots": self.slots, "in_flight": self.in_flight,
                "max_slots": self.max_slots, "tpot_target_ms": round(self.tpot_target_s * 1000, 1),
                "decreases": self.decreases}
