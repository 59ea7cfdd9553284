"""Suffix decoding (SuffixDecoding, arXiv 2411.04975): drafts from a suffix trie over the request's
own prompt and output, and optionally from a global one over the outputs of recent requests; the
draft with the higher score (expected accepted tokens) wins."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from common.engine.speculative.suffix_tree import Cursor, SuffixTrie

__all__ = ["SuffixProposer", "SuffixState"]

# Draft length may reach ALPHA x the matched pattern's length (the paper's adaptive MAX_SPEC).
ALPHA = 2.0


class SuffixState:
    __slots__ = ("consumed", "trie", "cursor", "global_cursor")

    def __init__(self, max_depth: int) -> None:
        self.consumed = 0
        self.trie = SuffixTrie(max_depth)
        self.cursor = Cursor()
        self.global_cursor = Cursor()


class SuffixProposer:
    def __init__(self, max_depth: int, min_prob: float, use_global: bool, global_requests: int) -> None:
        self.max_depth = max_depth
        self.min_prob = min_prob
        self.global_trie = SuffixTrie(max_depth) if use_global else None
        self._global_texts: deque[list[int]] = deque()
        self.global_requests = global_requests

    def new_state(self) -> SuffixState:
        return SuffixState(self.max_depth)

    def _consume(self, state: SuffixState, tokens: Sequence[int]) -> None:
        trie, cursor = state.trie, state.cursor
        global_trie, global_cursor = self.global_trie, state.global_cursor
        for token in tokens[state.consumed :]:
            trie.extend(cursor, token)
            if global_trie is not None:
                global_trie.follow(global_cursor, token)
        state.consumed = len(tokens)

    def propose(self, state: SuffixState, tokens: Sequence[int], k: int) -> list[int]:
        self._consume(state, tokens)
        if k <= 0:
            return []
        draft, score = state.trie.draft(state.cursor, k, self.min_prob, ALPHA)
        if self.global_trie is not None:
            other, other_score = self.global_trie.draft(state.global_cursor, k, self.min_prob, ALPHA)
            if other_score > score:
                draft = other
        return draft

    def finished(self, output_ids: Sequence[int]) -> None:
        """A request ended: its output joins the global trie (the oldest one leaves past the limit)."""
        if self.global_trie is None or not output_ids:
            return
        text = list(output_ids)
        self.global_trie.insert(text)
        self._global_texts.append(text)
        while len(self._global_texts) > self.global_requests:
            self.global_trie.remove(self._global_texts.popleft())
