"""Rate-limited logging: a hostile or broken peer must not turn one event into one log line each.

`RateLimitedLog` logs the first `burst` events of a key (a peer, a kind of refusal) in full per
`interval_s`; the rest of that interval are only counted, and one summary line says how many were
left out once the interval is over (on the next event of that key, or from a timer on the running
event loop, so a flood that stops still gets its summary). The number of keys it remembers is
bounded: a peer reconnecting under fresh identities cannot grow it without limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimitedLog"]

# Past this many remembered keys, new keys share one window (their lines read "(other peers)").
DEFAULT_MAX_KEYS = 256
_OTHER = "(other peers)"


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0
    timer: asyncio.TimerHandle | None = None


class RateLimitedLog:
    """At most `burst` full lines per key per `interval_s`, then one summary line per interval."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        *,
        level: int = logging.WARNING,
        interval_s: float = 10.0,
        burst: int = 5,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.what = what  # e.g. "invalid bus messages": the summary line's noun
        self.level = level
        self.interval_s = interval_s
        self.burst = burst
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, key: str, msg: str, *args: object) -> bool:
        """Log `msg % args` under `key` unless its budget for this interval is spent; True if logged."""
        now = self.clock()
        window = self._window(key, now)
        if window.logged < self.burst:
            window.logged += 1
            self.logger.log(self.level, msg, *args)
            return True
        window.suppressed += 1
        if window.suppressed == 1:
            self._arm_timer(key, window, now)
        return False

    def flush(self) -> None:
        """Emit every pending summary now (for shutdown and tests)."""
        for key in list(self._windows):
            self._summarize(key)

    def _window(self, key: str, now: float) -> _Window:
        if key not in self._windows and len(self._windows) >= self.max_keys:
            self._forget_expired(now)
            if len(self._windows) >= self.max_keys:
                key = _OTHER
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval_s:
            self._summarize(key)
            window = None
        if window is None:
            window = self._windows[key] = _Window(start=now)
        return window

    def _forget_expired(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval_s:
                self._summarize(key)

    def _arm_timer(self, key: str, window: _Window, now: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the summary comes with the key's next event
        delay = max(0.0, window.start + self.interval_s - now)
        window.timer = loop.call_later(delay, self._summarize, key)

    def _summarize(self, key: str) -> None:
        window = self._windows.pop(key, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        if window.suppressed:
            self.logger.log(self.level, "%d more %s from %s in the last %.0f s were not logged",
                            window.suppressed, self.what, key, self.interval_s)
