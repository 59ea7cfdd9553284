"""Stop strings on streamed text: cut at the first match, never leak a partial match.

Text is released as soon as it cannot be the start of a stop string, so streaming stays
prompt: only the last ``max(len(stop)) - 1`` characters are ever held back.
"""

from __future__ import annotations

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    def __init__(self, stops: list[str] | None) -> None:
        self.stops = [s for s in (stops or []) if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """Add new text; return what can be released now. After a match, returns ""."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return text
        buf = self._pending + text
        cut = -1
        for stop in self.stops:
            pos = buf.find(stop)
            if pos != -1 and (cut == -1 or pos < cut):
                cut, self.matched = pos, stop
        if cut != -1:
            self._pending = ""
            return buf[:cut]
        keep = self._partial_suffix_len(buf)
        self._pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation, release what was held back (it was not a stop string)."""
        out, self._pending = self._pending, ""
        return "" if self.matched is not None else out

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best
