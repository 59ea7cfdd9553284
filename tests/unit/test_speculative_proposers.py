"""The draft proposers of speculative decoding (n-gram lookup, suffix tries) and the acceptance rule."""

from __future__ import annotations

import random

import pytest

from common.engine.config import EngineConfig
from common.engine.speculative import accepted_length, make_speculator
from common.engine.speculative.ngram import NgramProposer
from common.engine.speculative.suffix import SuffixProposer
from common.engine.speculative.suffix_tree import Cursor, SuffixTrie


def test_ngram_proposes_what_followed_the_latest_match():
    proposer = NgramProposer(2, 4)
    state = proposer.new_state()
    text = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3]
    # [1, 2, 3] occurred twice before; the latest occurrence continued with 7, 8.
    assert proposer.propose(state, text, 3) == [7, 8, 1]
    # Incremental: a token more, and the 4-gram [8, 1, 2, 3] ... has no earlier occurrence,
    # [2, 3, 7] neither; the bigram [3, 7] did appear once.
    text += [7]
    assert proposer.propose(state, text, 2) == [8, 1]
    assert proposer.propose(state, [5, 6], 3) == []  # nothing repeats
    assert proposer.propose(state, text, 0) == []


def test_ngram_incremental_index_equals_a_fresh_one():
    rng = random.Random(0)
    text = [rng.randrange(6) for _ in range(300)]
    proposer = NgramProposer(1, 3)
    incremental = proposer.new_state()
    for end in range(2, len(text)):
        got = proposer.propose(incremental, text[:end], 4)
        assert got == proposer.propose(proposer.new_state(), text[:end], 4)


def _brute_counts(texts: list[list[int]], depth: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for text in texts:
        for i in range(len(text)):
            for j in range(i + 1, min(len(text), i + depth) + 1):
                counts[tuple(text[i:j])] = counts.get(tuple(text[i:j]), 0) + 1
    return counts


def _trie_counts(trie: SuffixTrie) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    stack = [(trie.root, ())]
    while stack:
        node, path = stack.pop()
        for token, child in node.children.items():
            assert child.count > 0
            counts[path + (token,)] = child.count
            stack.append((child, path + (token,)))
        assert node.cont == sum(c.count for c in node.children.values()) or node is trie.root
        if node.children:
            assert node.best is not None and node.best.count == max(c.count for c in node.children.values())
    return counts


def test_suffix_trie_counts_every_pattern_and_removal_undoes_insertion():
    rng = random.Random(1)
    texts = [[rng.randrange(4) for _ in range(rng.randrange(5, 40))] for _ in range(6)]
    trie = SuffixTrie(max_depth=5)
    for text in texts:
        trie.insert(text)
    assert _trie_counts(trie) == _brute_counts(texts, 5)
    for text in texts[:3]:
        trie.remove(text)
    assert _trie_counts(trie) == _brute_counts(texts[3:], 5)


def test_suffix_draft_follows_the_most_frequent_continuation():
    trie = SuffixTrie(max_depth=8)
    cursor = Cursor()
    text = [1, 2, 3, 4, 9, 1, 2, 3, 5, 8, 1, 2, 3, 5, 7, 1, 2]
    for token in text:
        trie.extend(cursor, token)
    # [7, 1, 2] is new; [1, 2] was continued by 3 three times, [1, 2, 3] by 5 twice (4 once),
    # [1, 2, 3, 5] by 8 and by 7 once each (a tie goes to the most recent).
    draft, score = trie.draft(cursor, 3, min_prob=0.0, alpha=4.0)
    assert draft == [3, 5, 7]
    assert score == pytest.approx(1.0 + 2 / 3 + 1 / 3)
    # A probability floor stops the run where the estimate falls under it.
    assert trie.draft(cursor, 3, min_prob=0.5, alpha=4.0)[0] == [3, 5]
    # The adaptive length: at most alpha x the matched pattern's length (2 here).
    assert trie.draft(cursor, 3, min_prob=0.0, alpha=0.5)[0] == [3]
    # One token on, the match is [1, 2, 3]: continued by 5 two times in three, then 8 or 7.
    trie.extend(cursor, 3)
    assert trie.draft(cursor, 2, min_prob=0.0, alpha=4.0)[0] == [5, 7]


def test_suffix_proposer_uses_other_requests_outputs():
    proposer = SuffixProposer(max_depth=16, min_prob=0.1, use_global=True, global_requests=2)
    proposer.finished([10, 11, 12, 13, 14, 15, 16])
    state = proposer.new_state()
    # The request's own text never continued [11, 12]; the earlier request's output did.
    assert proposer.propose(state, [1, 2, 10, 11, 12], 4) == [13, 14, 15, 16]
    # Past the limit the oldest outputs leave the global trie.
    proposer.finished([50, 51])
    proposer.finished([60, 61])
    assert proposer.propose(proposer.new_state(), [1, 2, 10, 11, 12], 4) == []
    local = SuffixProposer(max_depth=16, min_prob=0.1, use_global=False, global_requests=2)
    local.finished([10, 11, 12, 13])
    assert local.propose(local.new_state(), [10, 11, 12], 4) == []


def test_accepted_length_is_the_agreeing_prefix():
    assert accepted_length([5, 6, 7], [5, 6, 7, 8]) == 3
    assert accepted_length([5, 6, 7], [5, 9, 7, 8]) == 1
    assert accepted_length([5, 6, 7], [4, 6, 7, 8]) == 0
    assert accepted_length([], [4]) == 0


@pytest.mark.parametrize("bad, message", [
    (dict(speculative_method="medusa"), "speculative_method"),
    (dict(speculative_method="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
    (dict(speculative_method="ngram", ngram_min=4, ngram_max=2), "ngram_min"),
    (dict(speculative_method="suffix", suffix_max_depth=1), "suffix_max_depth"),
    (dict(speculative_method="suffix", suffix_min_prob=1.5), "suffix_min_prob"),
])
def test_bad_speculative_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        make_speculator(EngineConfig(**bad))


def test_no_speculator_unless_asked():
    assert make_speculator(EngineConfig()) is None
    assert make_speculator(EngineConfig(speculative_method="suffix")).method == "suffix"
