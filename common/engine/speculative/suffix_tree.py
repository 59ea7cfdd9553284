"""A depth-bounded suffix trie with occurrence counts, the data structure of SuffixDecoding
(arXiv 2411.04975), kept cheap in Python: appending a token touches at most ``max_depth`` nodes.

Each node is a pattern (the path from the root); ``count`` is how often it occurs, ``best`` the
child seen most often (ties: the most recent), ``cont`` how often the pattern was continued, so a
draft walks ``best`` links and scores each step by ``best.count / cont`` without scanning children.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["SuffixNode", "SuffixTrie", "Cursor"]


class SuffixNode:
    __slots__ = ("token", "depth", "count", "cont", "children", "best", "parent")

    def __init__(self, token: int, depth: int, parent: SuffixNode | None) -> None:
        self.token = token
        self.depth = depth
        self.count = 0
        self.cont = 0
        self.children: dict[int, SuffixNode] = {}
        self.best: SuffixNode | None = None
        self.parent = parent

    def _bump(self, child: SuffixNode) -> None:
        child.count += 1
        self.cont += 1
        if self.best is None or child.count >= self.best.count:
            self.best = child

    def _drop(self, child: SuffixNode) -> None:
        child.count -= 1
        self.cont -= 1
        if child.count == 0:
            del self.children[child.token]
        if self.best is child:
            self.best = max(self.children.values(), key=lambda c: c.count, default=None)


class Cursor:
    """Where a text's tail sits in a trie: the nodes of its suffixes (length 1 up), shallow first."""

    __slots__ = ("nodes",)

    def __init__(self) -> None:
        self.nodes: list[SuffixNode] = []


class SuffixTrie:
    def __init__(self, max_depth: int) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self.root = SuffixNode(-1, 0, None)

    def extend(self, cursor: Cursor, token: int) -> None:
        """Insert ``token`` after the text ``cursor`` ends: every suffix of it gains a continuation."""
        depth_limit = self.max_depth
        new_nodes: list[SuffixNode] = []
        for node in (self.root, *cursor.nodes):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = SuffixNode(token, node.depth + 1, node)
            node._bump(child)
            if child.depth < depth_limit:
                new_nodes.append(child)
        cursor.nodes = new_nodes

    def follow(self, cursor: Cursor, token: int) -> None:
        """Move a read-only cursor (a text that is not inserted) past ``token``."""
        depth_limit = self.max_depth
        new_nodes: list[SuffixNode] = []
        for node in (self.root, *cursor.nodes):
            child = node.children.get(token)
            if child is not None and child.count > 0 and child.depth < depth_limit:
                new_nodes.append(child)
        cursor.nodes = new_nodes

    def insert(self, tokens: Iterable[int]) -> None:
        cursor = Cursor()
        for token in tokens:
            self.extend(cursor, token)

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo :meth:`insert` of the same tokens (counts go down, empty nodes go away)."""
        for start in range(len(tokens)):
            node = self.root
            for token in tokens[start : start + self.max_depth]:
                child = node.children.get(token)
                if child is None:
                    break
                node._drop(child)
                node = child

    def draft(self, cursor: Cursor, k: int, min_prob: float, alpha: float) -> tuple[list[int], float]:
        """The most frequent continuation of the longest matched suffix that has one.

        Length at most ``k`` and ``alpha`` x the match length (a short match predicts little); it
        stops where the estimated probability of the whole run falls below ``min_prob``. Returns the
        tokens and their score: the expected number accepted (the sum of the run's probabilities).
        """
        # The deepest match that leaves room for k tokens below it, else the deepest match at all.
        match = None
        for node in reversed(cursor.nodes):
            if node.cont > 0 and node.count > 0:
                if match is None:
                    match = node
                if node.depth + k <= self.max_depth:
                    match = node
                    break
        if match is None:
            return [], 0.0
        limit = min(k, max(1, int(alpha * match.depth)))
        tokens: list[int] = []
        prob = 1.0
        score = 0.0
        node = match
        while len(tokens) < limit and node.best is not None and node.cont > 0:
            prob *= node.best.count / node.cont
            if prob < min_prob:
                break
            node = node.best
            tokens.append(node.token)
            score += prob
        return tokens, score
