import hashlib
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import common.engine.block_manager as bm_module
from common.engine.block_manager import BlockManager, NoFreePagesError, hash_page, prefix_hashes

PS = 4


def run(bm: BlockManager, seq_id, tokens) -> None:
    """Give a sequence room for all its tokens and commit them, as a runner would."""
    assert bm.ensure_capacity(seq_id, len(tokens))
    bm.commit(seq_id, tokens, len(tokens))
    bm.check_integrity()


class Events:
    def __init__(self):
        self.log: list[tuple[str, list[bytes]]] = []

    def __call__(self, kind, hashes):
        self.log.append((kind, list(hashes)))

    def of(self, kind):
        return [h for k, hs in self.log if k == kind for h in hs]


# ---- hashing ---------------------------------------------------------------------------


def test_hash_known_digest():
    assert hash_page(None, [1, 2, 3, 4], "").hex() == (
        "dd48987c598901f620ecfd4f544dd964f66e4ae990bdb1def8ab910f330ac609"
    )
    parent = hash_page(None, [1, 2, 3, 4], "")
    assert hash_page(parent, [5, 6, 7, 8], "m").hex() == (
        "c3c2b37370de489ed3008a33be3e9e8ace5b185cc2dbb4300c454e6d9eced7c4"
    )


def test_hash_is_blake2b_over_documented_bytes():
    parent = b"\x07" * 32
    expected = hashlib.blake2b(
        struct.pack("<BI", 32, 5) + parent + b"model" + struct.pack("<3i", 9, -1, 70000), digest_size=32
    ).digest()
    assert hash_page(parent, (9, -1, 70000), "model") == expected


def test_hash_depends_on_parent_tokens_and_namespace():
    base = hash_page(None, [1, 2], "a")
    assert len(base) == 32
    assert hash_page(None, [1, 2], "a") == base
    assert hash_page(None, [2, 1], "a") != base
    assert hash_page(None, [1, 2], "b") != base
    assert hash_page(base, [1, 2], "a") != base
    assert hash_page(None, (1, 2), "a") == base  # list vs tuple does not matter


def test_prefix_hashes_chain_full_pages_only():
    tokens = list(range(10))
    hashes = prefix_hashes(tokens, 4, "ns")
    assert len(hashes) == 2
    assert hashes[0] == hash_page(None, tokens[:4], "ns")
    assert hashes[1] == hash_page(hashes[0], tokens[4:8], "ns")
    assert prefix_hashes(tokens[:3], 4, "ns") == []


# ---- allocation ------------------------------------------------------------------------


def test_pages_taken_only_when_crossing_a_page_boundary():
    bm = BlockManager(num_pages=8, page_size=PS)
    assert bm.admit("a", [1, 2, 3]) == 0
    assert bm.page_table("a") == []
    assert bm.pages_needed("a", 3) == 1
    assert bm.ensure_capacity("a", 3)
    assert len(bm.page_table("a")) == 1
    assert bm.ensure_capacity("a", 4)
    assert len(bm.page_table("a")) == 1
    assert bm.pages_needed("a", 5) == 1
    assert bm.ensure_capacity("a", 5)
    assert len(bm.page_table("a")) == 2
    assert bm.pages_needed("a", 2) == 0
    assert bm.pages_needed("unknown", 9) == 3
    assert bm.num_used_pages == 2 and bm.num_free_pages == 6
    bm.check_integrity()


def test_page_zero_is_an_ordinary_page():
    bm = BlockManager(num_pages=2, page_size=PS)
    bm.admit("a", [1])
    assert bm.ensure_capacity("a", 8)
    assert sorted(bm.page_table("a")) == [0, 1]


def test_ensure_capacity_is_all_or_nothing():
    events = Events()
    bm = BlockManager(num_pages=4, page_size=PS, on_event=events)
    bm.admit("cached", [1, 2, 3, 4, 5])
    run(bm, "cached", [1, 2, 3, 4, 5])
    bm.free("cached")  # one evictable page + four free
    bm.admit("a", [9] * 3)
    assert bm.ensure_capacity("a", 4)
    table, free, cached = bm.page_table("a"), bm.num_free_pages, bm.num_cached_pages
    assert not bm.ensure_capacity("a", 4 * PS + 1)  # needs 4 more, only 3 available
    assert bm.page_table("a") == table
    assert (bm.num_free_pages, bm.num_cached_pages) == (free, cached)
    assert events.of("evicted") == []
    assert bm.ensure_capacity("a", 4 * PS)  # exactly fits: evicts the cached page
    assert bm.num_free_pages == 0
    assert len(events.of("evicted")) == 1
    bm.check_integrity()


def test_admit_twice_and_commit_past_capacity_are_errors():
    bm = BlockManager(num_pages=4, page_size=PS)
    bm.admit("a", [1, 2, 3])
    with pytest.raises(ValueError):
        bm.admit("a", [1])
    bm.ensure_capacity("a", 3)
    with pytest.raises(ValueError):
        bm.commit("a", [1, 2, 3, 4, 5], 5)
    with pytest.raises(KeyError):
        bm.ensure_capacity("nope", 1)
    bm.check_integrity()


# ---- prefix caching --------------------------------------------------------------------


def test_prefix_hit_across_sequences_shares_pages():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = list(range(10))
    bm.admit("a", a)
    run(bm, "a", a)
    assert bm.num_cached_pages == 2  # the partial third page is not registered
    b = a[:8] + [99, 98, 97]
    assert bm.lookup_prefix(b) == 8
    assert bm.lookup_prefix(b) == 8  # lookup has no side effects
    assert bm.admit("b", b) == 8
    assert bm.page_table("b") == bm.page_table("a")[:2]
    assert bm.num_used_pages == 3
    assert bm.ensure_capacity("b", len(b))
    assert bm.page_table("b")[2] not in bm.page_table("a")
    bm.check_integrity()
    # Diverging in the first page finds nothing.
    assert bm.lookup_prefix([0, 1, 2, 5] + a[4:]) == 0


def test_whole_prompt_cached_still_leaves_a_token_to_compute():
    bm = BlockManager(num_pages=8, page_size=PS)
    a = list(range(8))
    bm.admit("a", a)
    run(bm, "a", a)
    assert bm.lookup_prefix(a) == 4
    assert bm.admit("b", a) == 4
    assert bm.admit("c", a + [8]) == 8
    assert bm.admit("d", a[:4]) == 0
    assert bm.admit("e", []) == 0
    bm.check_integrity()


def test_partial_page_is_registered_once_it_fills():
    events = Events()
    bm = BlockManager(num_pages=8, page_size=PS, on_event=events)
    tokens = list(range(6))
    bm.admit("a", tokens)
    bm.ensure_capacity("a", 6)
    bm.commit("a", tokens, 3)
    assert bm.num_cached_pages == 0
    bm.commit("a", tokens, 6)
    assert bm.num_cached_pages == 1
    tokens += [6, 7]
    bm.ensure_capacity("a", 8)
    bm.commit("a", tokens, 8)
    assert bm.num_cached_pages == 2
    assert events.of("stored") == prefix_hashes(tokens, PS)
    bm.check_integrity()


def test_freed_cached_pages_stay_hittable_until_evicted():
    bm = BlockManager(num_pages=4, page_size=PS)
    a = list(range(9))
    bm.admit("a", a)
    run(bm, "a", a)
    pages = bm.page_table("a")
    bm.free("a")
    assert bm.num_used_pages == 0
    assert bm.num_cached_pages == 2
    assert bm.num_free_pages == 4
    assert bm.admit("b", a) == 8
    assert bm.page_table("b") == pages[:2]
    assert bm.num_free_pages == 2  # the shared pages left the evictable LRU
    bm.check_integrity()


def test_lru_evicts_oldest_sequence_first_and_tail_pages_first():
    events = Events()
    bm = BlockManager(num_pages=4, page_size=PS, on_event=events)
    a, b = [1] * 8, [2] * 8
    for sid, toks in (("a", a), ("b", b)):
        bm.admit(sid, toks)
        run(bm, sid, toks)
    ha, hb = prefix_hashes(a, PS), prefix_hashes(b, PS)
    bm.free("a")
    bm.free("b")
    bm.admit("c", [3])
    for expected in (ha[1], ha[0], hb[1], hb[0]):
        bm.ensure_capacity("c", len(bm.page_table("c")) * PS + 1)
        assert events.of("evicted")[-1] == expected
        bm.check_integrity()
    assert bm.num_cached_pages == 0


def test_reusing_a_cached_prefix_refreshes_its_lru_position():
    events = Events()
    bm = BlockManager(num_pages=2, page_size=PS, on_event=events)
    a, b = [1] * 5, [2] * 5
    for sid, toks in (("a", a), ("b", b)):
        bm.admit(sid, toks)
        run(bm, sid, toks[:4])
        bm.free(sid)
    assert bm.admit("a2", a) == 4  # a's page becomes the most recently used
    bm.free("a2")
    bm.admit("c", [3])
    bm.ensure_capacity("c", 1)
    assert events.of("evicted") == prefix_hashes(b, PS)
    assert bm.lookup_prefix(a) == 4 and bm.lookup_prefix(b) == 0


def test_duplicate_content_keeps_first_mapping_and_stays_private():
    bm = BlockManager(num_pages=8, page_size=PS)
    tokens = [5] * 5
    bm.admit("a", tokens)
    bm.admit("b", tokens)  # both admitted before either computed: no sharing possible
    run(bm, "a", tokens)
    run(bm, "b", tokens)
    assert bm.num_cached_pages == 1
    assert bm.page_table("b")[0] != bm.page_table("a")[0]
    bm.free("b")  # b's duplicate page is private: straight to the free list
    assert bm.stats()["pages_evictable"] == 0
    bm.free("a")
    assert bm.stats()["pages_evictable"] == 1
    bm.check_integrity()


def test_readmitting_a_preempted_sequence_reuses_outputs_too():
    bm = BlockManager(num_pages=8, page_size=PS)
    prompt = [1, 2, 3, 4, 5, 6]
    bm.admit("a", prompt)
    run(bm, "a", prompt)
    tokens = prompt + [7, 8, 9, 10]  # three decoded outputs
    run(bm, "a", tokens)
    bm.free("a")  # preempted by recompute
    assert bm.admit("a", tokens) == 8
    bm.check_integrity()


def test_hash_collision_never_returns_wrong_pages(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_page", lambda parent, tokens, namespace: b"\x00" * 32)
    bm = BlockManager(num_pages=8, page_size=PS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    bm.admit("a", a)
    run(bm, "a", a)
    assert bm.num_cached_pages == 1  # the second page collides with the first and stays private
    assert bm.lookup_prefix([9, 9, 9, 9, 5]) == 0  # same hash, different tokens
    assert bm.lookup_prefix([1, 2, 3, 4, 1, 2, 3, 4, 0]) == 4  # same tokens, different parent
    assert bm.admit("b", [1, 2, 3, 4, 1]) == 4
    assert bm.page_table("b") == bm.page_table("a")[:1]


def test_namespaces_do_not_share():
    shared = BlockManager(num_pages=8, page_size=PS, namespace="model-a")
    tokens = list(range(9))
    shared.admit("a", tokens)
    run(shared, "a", tokens)
    other = BlockManager(num_pages=8, page_size=PS, namespace="model-b")
    other.admit("a", tokens)
    run(other, "a", tokens)
    assert prefix_hashes(tokens, PS, "model-a") != prefix_hashes(tokens, PS, "model-b")


def test_prefix_cache_disabled():
    events = Events()
    bm = BlockManager(num_pages=4, page_size=PS, enable_prefix_cache=False, on_event=events)
    tokens = list(range(9))
    bm.admit("a", tokens)
    run(bm, "a", tokens)
    assert bm.num_cached_pages == 0
    assert bm.lookup_prefix(tokens) == 0
    assert bm.admit("b", tokens) == 0
    bm.free("a")
    assert bm.stats()["pages_free"] == 4
    assert events.log == []
    bm.check_integrity()


# ---- free, stats, integrity -------------------------------------------------------------


def test_free_unknown_and_double_free_are_noops():
    bm = BlockManager(num_pages=4, page_size=PS)
    bm.free("never-admitted")
    bm.admit("a", [1, 2, 3])
    bm.ensure_capacity("a", 3)
    bm.free("a")
    bm.free("a")
    assert bm.num_used_pages == 0 and bm.num_free_pages == 4
    bm.check_integrity()


def test_stats():
    bm = BlockManager(num_pages=8, page_size=PS)
    tokens = list(range(9))
    bm.admit(1, tokens)
    run(bm, 1, tokens)
    bm.admit(2, tokens)
    s = bm.stats()
    assert s["pages_total"] == 8
    assert s["pages_used"] == 3
    assert s["pages_free"] == 5
    assert s["pages_available"] == 5
    assert s["pages_cached"] == 2
    assert s["prefix_queries"] == 2
    assert s["prefix_query_tokens"] == 18
    assert s["prefix_hit_tokens"] == 8
    assert s["prefix_hit_rate"] == pytest.approx(8 / 18)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda bm: bm._refcount.__setitem__(bm.page_table("a")[0], 2), "refcount"),
        (lambda bm: bm._free.append(bm.page_table("a")[0]), "states"),
        (lambda bm: bm._seqs["a"].pages.append(bm._seqs["a"].pages[0]), "twice"),
        (lambda bm: bm._hash_to_page.__setitem__(b"x" * 32, bm.page_table("a")[0]), "hash"),
        (lambda bm: bm._free.append(bm._free[0]), "free list twice"),
    ],
)
def test_check_integrity_detects_corruption(corrupt, message):
    bm = BlockManager(num_pages=6, page_size=PS)
    tokens = list(range(9))
    bm.admit("a", tokens)
    run(bm, "a", tokens)
    corrupt(bm)
    with pytest.raises(AssertionError, match=message):
        bm.check_integrity()


# ---- property-based --------------------------------------------------------------------

POOL = 10
ALPHABET = st.integers(0, 1)
# Prompts start from a few shared bases so that prefixes repeat across sequences.
BASES = [[], [0] * 4, [0, 1, 0, 1, 1, 1, 0, 0], [1] * 8, [0, 1, 0, 1, 1, 1, 0, 0, 1, 0, 0, 1]]
PROMPTS = st.builds(
    lambda base, tail: (base + tail) or [0], st.sampled_from(BASES), st.lists(ALPHABET, max_size=5)
)


class BlockManagerMachine(RuleBasedStateMachine):
    """Random traffic over a tiny pool; a fake KV cache records which prefix each slot holds.

    A slot's "KV" is the tuple of tokens up to and including its position, so a prefix hit
    that hands out the wrong page, or a write into a shared page, shows up as a mismatch.
    """

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(num_pages=POOL, page_size=PS, namespace="prop", on_reclaim=self._reclaimed)
        self.kv: list[list[tuple | None]] = [[None] * PS for _ in range(POOL)]
        self.tokens: dict[int, list[int]] = {}
        self.computed: dict[int, int] = {}
        self.next_id = 0

    def _reclaimed(self, pages: list[int], hashes: list[bytes]) -> None:
        # Called before a reused cached page is handed out: its KV must still be what its hash names.
        for page, h in zip(pages, hashes):
            last = self.kv[page][PS - 1]
            assert last is not None and prefix_hashes(list(last), PS, "prop")[-1] == h, f"page {page} changed"

    def _write_fresh(self, indices: list[int], pages: list[int], toks: list[int]) -> None:
        for index, page in zip(indices, pages):
            assert all(page not in self.bm.page_table(s) for s in self.tokens), f"page {page} is referenced"
            for slot in range(PS):
                self.kv[page][slot] = tuple(toks[: index * PS + slot + 1])

    def _pick(self, index: int) -> int:
        live = sorted(self.tokens)
        return live[index % len(live)]

    def _assert_kv(self, sid: int, upto: int) -> None:
        table = self.bm.page_table(sid)
        toks = self.tokens[sid]
        for pos in range(upto):
            assert self.kv[table[pos // PS]][pos % PS] == tuple(toks[: pos + 1]), (sid, pos)

    def _compute(self, sid: int, chunk: int, sampled: list[int]) -> None:
        """One engine step for a sequence: a prefill chunk, or a decode of sampled tokens."""
        toks, done = self.tokens[sid], self.computed[sid]
        appended = 0
        if done == len(toks):
            toks.extend(sampled)
            appended = len(sampled)
        target = min(len(toks), done + chunk)
        table, available = self.bm.page_table(sid), self.bm.num_free_pages
        needed = self.bm.pages_needed(sid, target)
        if not self.bm.ensure_capacity(sid, target):
            assert needed > available
            assert self.bm.page_table(sid) == table and self.bm.num_free_pages == available
            del toks[len(toks) - appended :]  # the step did not run: nothing was sampled
            return
        assert self.bm.num_free_pages == available - needed
        table = self.bm.page_table(sid)
        for pos in range(done, target):
            page = table[pos // PS]
            owners = [s for s in self.tokens if page in self.bm.page_table(s)]
            assert owners == [sid], f"writing page {page} shared by {owners}"
            self.kv[page][pos % PS] = tuple(toks[: pos + 1])
        self.bm.commit(sid, toks, target)
        self.computed[sid] = target

    @rule(prompt=PROMPTS, chunk=st.integers(1, 16))
    def admit(self, prompt, chunk):
        sid = self.next_id
        self.next_id += 1
        expected = self.bm.lookup_prefix(prompt)
        cached = self.bm.admit(sid, prompt)
        assert cached == expected
        assert cached % PS == 0 and cached < len(prompt)
        self.tokens[sid] = list(prompt)
        self.computed[sid] = cached
        self._assert_kv(sid, cached)
        self._compute(sid, chunk, [0])

    @precondition(lambda self: self.tokens)
    @rule(index=st.integers(0, 50), chunk=st.integers(1, 8), sampled=st.lists(ALPHABET, min_size=1, max_size=4))
    def grow(self, index, chunk, sampled):
        self._compute(self._pick(index), chunk, sampled)

    @precondition(lambda self: self.tokens)
    @rule(chunk=st.integers(1, 8), token=ALPHABET)
    def step_all(self, chunk, token):
        for sid in sorted(self.tokens):
            self._compute(sid, chunk, [token])

    @precondition(lambda self: self.tokens)
    @rule(index=st.integers(0, 50))
    def finish_or_abort(self, index):
        sid = self._pick(index)
        self.bm.free(sid)
        del self.tokens[sid], self.computed[sid]

    @precondition(lambda self: self.tokens)
    @rule(index=st.integers(0, 50))
    def preempt_and_readmit(self, index):
        sid = self._pick(index)
        self.bm.free(sid)
        self.computed[sid] = self.bm.admit(sid, self.tokens[sid])
        self._assert_kv(sid, self.computed[sid])

    @rule(prompt=PROMPTS, start=st.integers(0, 3), count=st.integers(1, 4))
    def insert_cached(self, prompt, start, count):
        """Pages of ``prompt`` reloaded from a lower store tier."""
        have = self.bm.cached_prefix_pages(prompt)
        full = len(prompt) // PS
        # The prefix being extended is pinned while the new pages are taken, so it is not room.
        prefix = self.bm._match_prefix(prompt, leave_one=False)[0]
        available = self.bm.num_free_pages - sum(1 for p in prefix if self.bm._refcount[p] == 0)
        inserted = self.bm.insert_cached(
            prompt, start, count, lambda idx, pages: self._write_fresh(idx, pages, prompt)
        )
        if start > have:
            assert inserted == 0
            return
        want = max(0, min(start + count, full) - have)
        after = self.bm.cached_prefix_pages(prompt)
        assert inserted <= min(want, available) and after >= have + inserted
        if inserted < min(want, available):
            # Inserting stops where the chain meets a page that is cached already (left behind
            # when an earlier page of the chain was evicted); the prefix then runs through it.
            assert after > have + inserted

    @rule(prompt=PROMPTS, sampled=ALPHABET)
    def reserve_and_commit(self, prompt, sampled):
        """A sequence whose KV arrives from another worker (P/D hand-off)."""
        sid = self.next_id
        needed = -(-len(prompt) // PS)
        available = self.bm.num_free_pages
        if needed > available:
            with pytest.raises(NoFreePagesError):
                self.bm.reserve(sid, len(prompt))
            assert sid not in self.bm and self.bm.num_free_pages == available
            return
        self.next_id += 1
        pages = self.bm.reserve(sid, len(prompt))
        assert len(pages) == needed and self.bm.num_free_pages == available - needed
        self._write_fresh(list(range(needed)), pages, prompt)
        self.tokens[sid] = list(prompt) + [sampled]
        self.bm.commit(sid, self.tokens[sid], len(prompt))
        self.computed[sid] = len(prompt)

    @rule()
    def free_unknown(self):
        self.bm.free("no-such-sequence")

    @invariant()
    def consistent(self):
        self.bm.check_integrity()
        assert self.bm.num_used_pages + self.bm.num_free_pages == POOL
        for sid in self.tokens:
            self._assert_kv(sid, self.computed[sid])
        # A page held by two sequences must be full and computed in both: nobody writes to it.
        holders: dict[int, list[tuple[int, int]]] = {}
        for sid in self.tokens:
            for index, page in enumerate(self.bm.page_table(sid)):
                holders.setdefault(page, []).append((sid, index))
        for page, held in holders.items():
            if len(held) > 1:
                for sid, index in held:
                    assert (index + 1) * PS <= self.computed[sid], f"page {page} shared while writable"

    def teardown(self):
        for sid in list(self.tokens):
            self.bm.free(sid)
        self.bm.check_integrity()
        assert self.bm.num_used_pages == 0
        stats = self.bm.stats()
        assert stats["pages_free"] + stats["pages_cached"] == POOL


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestBlockManagerMachine = BlockManagerMachine.TestCase
