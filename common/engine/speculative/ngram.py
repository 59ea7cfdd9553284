"""N-gram prompt lookup: the draft is what followed the latest earlier occurrence of the text's tail.

Incremental: each new token registers the n-grams that end just before it (n in [min_n, max_n])
with the position it continues them at, so a proposal is ``max_n - min_n + 1`` dict lookups
whatever the context length.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["NgramProposer", "NgramState"]


class NgramState:
    """One sequence's index: n-gram -> the position right after its latest occurrence that has a successor."""

    __slots__ = ("consumed", "index")

    def __init__(self) -> None:
        self.consumed = 0  # tokens of the sequence indexed so far
        self.index: dict[tuple[int, ...], int] = {}


class NgramProposer:
    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def new_state(self) -> NgramState:
        return NgramState()

    def _consume(self, state: NgramState, tokens: Sequence[int]) -> None:
        index, min_n, max_n = state.index, self.min_n, self.max_n
        for pos in range(max(state.consumed, 1), len(tokens)):
            # Token `pos` continues every n-gram that ends at pos - 1.
            for n in range(min_n, min(max_n, pos) + 1):
                index[tuple(tokens[pos - n : pos])] = pos
        state.consumed = len(tokens)

    def propose(self, state: NgramState, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` draft tokens continuing ``tokens`` (the sequence so far), longest match first."""
        self._consume(state, tokens)
        if k <= 0:
            return []
        end = len(tokens)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            start = state.index.get(tuple(tokens[end - n :]))
            if start is not None:
                return list(tokens[start : start + k])
        return []
