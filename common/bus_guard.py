"""What keeps junk on a bus socket cheap: pacing, per-peer error budgets, counted and rate-limited drops.

A flood of invalid messages (a broken or hostile peer on a frontend socket) must not starve the
rest of the process: before this guard, 100k junk messages blocked the scheduler's event loop
for seconds (pyzmq hands back messages that are already queued without yielding to the loop, and
each drop wrote a WARNING line), so heartbeats from healthy workers went unread and the workers
were evicted. Each socket `bus.recv` reads gets one `InboundGuard`:

- pacing: every `yield_every` messages received, valid or not, the reader yields to the event
  loop once, so other sockets' readers (the scheduler's heartbeats) and timers get their turn;
- an error budget per peer on sockets that name their peer (ROUTER identities): past `budget`
  invalid messages within `window_s` the peer is muted until that window ends, and everything it
  sends is dropped unread (only counted). Sockets without peer identities (PULL, DEALER, SUB with
  topics shared by all senders) are never muted, since muting would also drop honest senders;
- drops are counted by kind (`invalid_message_counts()`, for status pages and /metrics) and
  logged through `RateLimitedLog`: the first few per peer per interval in full, then a summary.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from common.log_limits import RateLimitedLog

__all__ = ["InboundGuard", "invalid_message_counts", "RATE_LIMITED"]

logger = logging.getLogger("common.bus")

DEFAULT_YIELD_EVERY = 64
DEFAULT_ERROR_BUDGET = 200  # invalid messages per peer per window before it is muted
DEFAULT_WINDOW_S = 10.0
MAX_TRACKED_PEERS = 1024
RATE_LIMITED = "rate_limited"  # the kind counted for messages of a muted peer, dropped unread

# Process-wide counts of dropped messages by kind: one process is one service, so these are the
# service's numbers (the scheduler puts them in its status summary, the gateway in /metrics).
_COUNTS: Counter[str] = Counter()

LOG_BURST = 10  # full lines per peer per window; then one summary line per window

def invalid_message_counts() -> dict[str, int]:
    """Dropped inbound bus messages of this process so far, by kind (see `common.codec`)."""
    return dict(_COUNTS)


class _Lazy:
    """A log argument computed only if the line is written (a peer address costs a syscall)."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], str]) -> None:
        self.make = make

    def __str__(self) -> str:
        return self.make()


@dataclass
class _Budget:
    start: float
    errors: int = 0
    muted: bool = False


class InboundGuard:
    """The per-socket state `bus.recv` consults for each message it reads."""

    def __init__(
        self,
        socket_name: str,
        *,
        per_peer: bool,
        yield_every: int = DEFAULT_YIELD_EVERY,
        budget: int = DEFAULT_ERROR_BUDGET,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_name = socket_name
        self.per_peer = per_peer
        self.yield_every = yield_every
        self.budget = budget
        self.window_s = window_s
        self.clock = clock
        self._since_yield = 0
        self._peers: dict[bytes, _Budget] = {}
        self._drop_log = RateLimitedLog(logger, f"invalid messages on this {socket_name} socket",
                                        interval_s=window_s, burst=LOG_BURST, clock=clock)
        self._mute_log = RateLimitedLog(logger, "muted bus peers", interval_s=window_s, burst=LOG_BURST,
                                        clock=clock)

    async def pace(self) -> None:
        """Call once per message read: yields to the event loop every `yield_every` calls."""
        self._since_yield += 1
        if self._since_yield >= self.yield_every:
            self._since_yield = 0
            await asyncio.sleep(0)

    def admit(self, peer: bytes | None) -> bool:
        """False for a muted peer: drop its message unread (it is counted here)."""
        if not self.per_peer or peer is None:
            return True
        budget = self._peers.get(peer)
        if budget is None or not budget.muted:
            return True
        if self.clock() - budget.start >= self.window_s:
            del self._peers[peer]  # its window is over: a fresh budget
            return True
        _COUNTS[RATE_LIMITED] += 1
        return False

    def refused(self, peer: bytes | None, kind: str, reason: str, describe: Callable[[], str]) -> None:
        """Count and (rate-limited) log one dropped message; may mute its peer."""
        _COUNTS[kind] += 1
        # The key is cheap (no peer address lookup per message): the identity, if there is one.
        key = "this socket's peers" if peer is None else repr(peer)[:80]
        self._drop_log.log(key, "dropped invalid message on %s socket from %s: %s", self.socket_name, _Lazy(describe),
                      reason)
        if self.per_peer and peer is not None:
            self._charge(peer, describe)

    def _charge(self, peer: bytes, describe: Callable[[], str]) -> None:
        now = self.clock()
        budget = self._peers.get(peer)
        if budget is None or now - budget.start >= self.window_s:
            if budget is None and len(self._peers) >= MAX_TRACKED_PEERS:
                self._forget_some(now)
            budget = self._peers[peer] = _Budget(start=now)
        budget.errors += 1
        if budget.errors > self.budget and not budget.muted:
            budget.muted = True
            self._mute_log.log("this socket", "muted %s on %s socket: %d invalid messages within %.0f s; "
                          "its messages are dropped unread for the rest of that window",
                          _Lazy(describe), self.socket_name, budget.errors - 1, self.window_s)

    def _forget_some(self, now: float) -> None:
        for peer, budget in list(self._peers.items()):
            if now - budget.start >= self.window_s:
                del self._peers[peer]
        while len(self._peers) >= MAX_TRACKED_PEERS:  # all current: forget the oldest
            del self._peers[next(iter(self._peers))]
