"""The step watchdog: a worker whose engine step is stuck kills itself, so it can be replaced.

A wedged engine (a hung kernel, a deadlock in a native library) keeps the process alive and its
asyncio loop heartbeating, so the scheduler would never declare it dead and its streams would
hang. A plain thread (not the event loop, which may be the thing that is stuck, nor the engine
thread) watches how long the current step has run; past the limit it logs one line and
`os._exit`s with a distinct status: the scheduler sees the socket close (or the heartbeats stop)
and recovers the requests, the launcher restarts the process.
"""

from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["StepWatchdog", "WATCHDOG_EXIT_CODE"]

logger = logging.getLogger(__name__)

# The exit status of a worker the watchdog ended (distinct from crashes and usage errors).
WATCHDOG_EXIT_CODE = 86


class StepWatchdog:
    def __init__(self, limit_s: float, name: str, exit_code: int = WATCHDOG_EXIT_CODE) -> None:
        self.limit_s = limit_s  # <= 0: disabled
        self.name = name
        self.exit_code = exit_code
        self._started_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.limit_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def step_began(self) -> None:
        self._started_at = time.monotonic()

    def step_ended(self) -> None:
        self._started_at = None

    def overdue(self, now: float | None = None) -> float:
        """Seconds the current step has run past the limit (<= 0: fine or idle)."""
        started = self._started_at
        if started is None or self.limit_s <= 0:
            return 0.0
        return (now if now is not None else time.monotonic()) - started - self.limit_s

    def _run(self) -> None:
        interval = min(1.0, self.limit_s / 4)
        while not self._stop.wait(interval):
            if self.overdue() > 0:
                logger.critical("worker %s: engine step stuck for more than %.1f s: exiting with status %d "
                                "so it is replaced", self.name, self.limit_s, self.exit_code)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(self.exit_code)
