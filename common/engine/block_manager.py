"""Page tables and prefix caching over a fixed pool of KV pages.

Every page is in exactly one state:

* **free** — no content worth keeping, on the free list;
* **referenced** — in the page table of at least one sequence (``refcount > 0``);
* **evictable** — nobody references it, but its content is registered in the prefix cache, so a
  new sequence with the same prefix can still take it; reclaimed least-recently-used first.

A full page is named by a chained hash over its tokens and its parent page's hash, so one hash
names one whole prefix. Pages whose content another page already registered stay private.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["BlockManager", "NoFreePagesError", "hash_page", "prefix_hashes"]

EventCallback = Callable[[str, list[bytes]], None]
# (page ids, their hashes) of cached pages about to be handed out again: their KV is still intact.
ReclaimCallback = Callable[[list[int], list[bytes]], None]


class NoFreePagesError(RuntimeError):
    """Raised by :meth:`BlockManager.reserve` when the pool cannot hold the pages."""


def hash_page(parent: bytes | None, tokens: Sequence[int], namespace: str) -> bytes:
    """Stable 32-byte name of a page: blake2b over parent hash, tokens (int32 LE) and namespace."""
    h = hashlib.blake2b(digest_size=32)
    parent = parent or b""
    ns = namespace.encode()
    # Length prefixes keep the fields unambiguous (no parent vs. a parent, namespace vs. tokens).
    h.update(struct.pack("<BI", len(parent), len(ns)))
    h.update(parent)
    h.update(ns)
    try:
        h.update(struct.pack(f"<{len(tokens)}i", *tokens))
    except struct.error:
        # An image page: its placeholders are virtual ids past int32 (common.engine.multimodal);
        # 8 bytes each plus a tag, a different length than any text page of the same size.
        h.update(b"img" + struct.pack(f"<{len(tokens)}Q", *tokens))
    return h.digest()


PageKey = tuple[bytes | None, tuple[int, ...]]  # (parent hash, tokens): what a page's hash names


def _chain(
    token_ids: Sequence[int], page_size: int, namespace: str, first: int, end: int, parent: bytes | None = None
) -> Iterator[tuple[int, PageKey, bytes]]:
    """``(index, (parent, tokens), hash)`` of full pages ``first .. end - 1`` of ``token_ids``, chained
    on from ``parent`` (page ``first - 1``'s hash). Lazy: a caller that stops early hashes no more."""
    for index in range(first, end):
        key = (parent, tuple(token_ids[index * page_size : (index + 1) * page_size]))
        parent = hash_page(*key, namespace)
        yield index, key, parent


def prefix_hashes(token_ids: Sequence[int], page_size: int, namespace: str = "") -> list[bytes]:
    """Chained hashes of each full page of ``token_ids``."""
    return [h for _, _, h in _chain(token_ids, page_size, namespace, 0, len(token_ids) // page_size)]


@dataclass
class _Sequence:
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chained hash of each hashed full page
    num_hashed: int = 0  # leading pages already processed by commit (or shared at admit)
    num_computed: int = 0  # tokens whose KV is in the cache


class BlockManager:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        namespace: str = "",
        enable_prefix_cache: bool = True,
        *,
        on_event: EventCallback | None = None,
        on_reclaim: ReclaimCallback | None = None,
    ) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.namespace = namespace
        self.enable_prefix_cache = enable_prefix_cache
        self.on_event = on_event
        self.on_reclaim = on_reclaim  # before anything overwrites reclaimed pages: a last chance to copy them
        # Taken from the left; freed pages go back on the left, so the next allocation reuses memory
        # already touched (on the CPU a pool page's first touch is a page fault) before a fresh one.
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._refcount = [0] * num_pages
        self._seqs: dict[Hashable, _Sequence] = {}
        self._hash_to_page: dict[bytes, int] = {}
        self._page_hash: dict[int, bytes] = {}
        # (parent hash, tokens) of each registered page: a hit is only taken when these match.
        self._page_key: dict[int, PageKey] = {}
        self._prefix_queries = 0
        self._prefix_query_tokens = 0
        self._prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        """Pages a sequence can still take: free plus evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_blank_pages(self) -> int:
        """Free pages that hold no cached prefix: taking them evicts nothing."""
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free) - len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages registered in the prefix cache, referenced or evictable."""
        return len(self._page_hash)

    def cached_hashes(self) -> list[bytes]:
        """Every hash registered in the prefix cache (for a prefix index's resync)."""
        return list(self._hash_to_page)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def page_table(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].pages)

    def pages_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        """Pages to add so the sequence covers ``num_tokens`` slots (an unknown id has none yet)."""
        seq = self._seqs.get(seq_id)
        have = len(seq.pages) if seq is not None else 0
        return max(0, -(-num_tokens // self.page_size) - have)

    def _match_prefix(self, token_ids: Sequence[int], leave_one: bool = True) -> tuple[list[int], list[bytes]]:
        """Cached pages (and their hashes) of the longest cached prefix.

        With ``leave_one`` at least one token is left out (a sequence must compute >= 1 token
        to sample); without it every full page may match. Touches neither LRU order nor stats.
        """
        pages: list[int] = []
        hashes: list[bytes] = []
        if not self.enable_prefix_cache:
            return pages, hashes
        usable = len(token_ids) - 1 if leave_one else len(token_ids)
        for _, key, h in _chain(token_ids, self.page_size, self.namespace, 0, usable // self.page_size):
            page = self._hash_to_page.get(h)
            if page is None or self._page_key[page] != key:
                break
            pages.append(page)
            hashes.append(h)
        return pages, hashes

    def lookup_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens :meth:`admit` would find cached for this prompt; changes nothing."""
        return len(self._match_prefix(token_ids)[0]) * self.page_size

    def cached_prefix_pages(self, token_ids: Sequence[int]) -> int:
        """How many leading full pages of ``token_ids`` are registered; changes nothing."""
        return len(self._match_prefix(token_ids, leave_one=False)[0])

    # ---- sequence lifecycle --------------------------------------------------------------

    def admit(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
        """Start a page table sharing the longest cached prefix; returns the cached token count."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        pages, hashes = self._match_prefix(token_ids)
        for page in pages:
            self._take_reference(page)
        cached = len(pages) * self.page_size
        self._seqs[seq_id] = _Sequence(pages, hashes, num_hashed=len(pages), num_computed=cached)
        self._prefix_queries += 1
        self._prefix_query_tokens += len(token_ids)
        self._prefix_hit_tokens += cached
        return cached

    def ensure_capacity(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Grow the table to cover ``num_tokens`` slots; all or nothing."""
        seq = self._seqs[seq_id]
        needed = self.pages_needed(seq_id, num_tokens)
        if needed > self.num_free_pages:
            return False
        evicted: list[tuple[int, bytes]] = []
        for _ in range(needed):
            seq.pages.append(self._allocate_page(evicted))
        self._emit_reclaimed(evicted)
        return True

    def reserve(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Start a page table of fresh pages for ``num_tokens`` slots, sharing nothing.

        For KV that arrives from elsewhere (a prefill worker): the caller writes the pages,
        then :meth:`commit` registers the full ones. Evicts cached pages if it must, never
        referenced ones; raises :class:`NoFreePagesError` (changing nothing) when they do not fit.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        needed = -(-num_tokens // self.page_size)
        if needed > self.num_free_pages:
            raise NoFreePagesError(f"{needed} pages needed for {num_tokens} tokens, {self.num_free_pages} available")
        evicted: list[tuple[int, bytes]] = []
        pages = [self._allocate_page(evicted) for _ in range(needed)]
        self._seqs[seq_id] = _Sequence(pages)
        self._emit_reclaimed(evicted)
        return list(pages)

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that the first ``num_computed`` tokens' KV is cached; hash and register full pages."""
        seq = self._seqs[seq_id]
        ps = self.page_size
        if num_computed > len(seq.pages) * ps or num_computed > len(token_ids):
            raise ValueError(
                f"sequence {seq_id!r}: {num_computed} computed tokens but {len(seq.pages)} pages "
                f"and {len(token_ids)} token ids"
            )
        if num_computed < seq.num_hashed * ps:
            raise ValueError(f"sequence {seq_id!r}: cannot uncompute {seq.num_hashed} hashed pages")
        seq.num_computed = num_computed
        full = num_computed // ps
        if full <= seq.num_hashed:
            return
        if not self.enable_prefix_cache:
            seq.num_hashed = full
            return
        stored: list[bytes] = []
        parent = seq.hashes[-1] if seq.hashes else None
        for index, key, h in _chain(token_ids, ps, self.namespace, seq.num_hashed, full, parent):
            seq.hashes.append(h)
            page = seq.pages[index]
            if h not in self._hash_to_page:
                self._hash_to_page[h] = page
                self._page_hash[page] = h
                self._page_key[page] = key
                stored.append(h)
        seq.num_hashed = full
        self._emit("stored", stored)

    def fork(self, parent_seq_id: Hashable, child_seq_id: Hashable) -> tuple[int, int] | None:
        """Start ``child_seq_id`` as a copy of the parent's page table (beam search).

        Every page whose slots are all computed is shared by reference. The page the next token
        goes into, when partly filled, is copied on write: the child gets a fresh page and the
        returned ``(source, destination)`` pair, whose KV the caller copies in the pool before
        either sequence computes again. Raises :class:`NoFreePagesError` (changing nothing) when
        that page cannot be had.
        """
        if child_seq_id in self._seqs:
            raise ValueError(f"sequence {child_seq_id!r} is already admitted")
        parent = self._seqs[parent_seq_id]
        num_full = parent.num_computed // self.page_size
        partial = parent.num_computed % self.page_size != 0
        if partial and self.num_free_pages < 1:
            raise NoFreePagesError("no free page for the copy-on-write of a forked sequence's last page")
        pages = parent.pages[:num_full]
        for page in pages:
            self._take_reference(page)
        copy: tuple[int, int] | None = None
        if partial:
            evicted: list[tuple[int, bytes]] = []
            page = self._allocate_page(evicted)
            self._emit_reclaimed(evicted)
            copy = (parent.pages[num_full], page)
            pages = pages + [page]
        self._seqs[child_seq_id] = _Sequence(
            pages, list(parent.hashes), num_hashed=parent.num_hashed, num_computed=parent.num_computed
        )
        return copy
    def trim(self, seq_id: Hashable, num_tokens: int) -> None:
        """Release the pages past the first ``num_tokens`` slots (rejected speculative drafts'
        slots); those pages hold no committed token."""
        seq = self._seqs[seq_id]
        keep = -(-num_tokens // self.page_size)
        if keep < seq.num_hashed:
            raise ValueError(f"sequence {seq_id!r}: cannot trim into {seq.num_hashed} hashed pages")
        if keep < len(seq.pages):
            extra = seq.pages[keep:]
            del seq.pages[keep:]
            self._release(extra)

    def free(self, seq_id: Hashable) -> None:
        """Drop a finished or aborted sequence; unknown ids are ignored."""
        seq = self._seqs.pop(seq_id, None)
        if seq is not None:
            self._release(seq.pages)

    def insert_cached(
        self,
        token_ids: Sequence[int],
        start_page: int,
        num_pages: int,
        write: Callable[[list[int], list[int]], None],
    ) -> int:
        """Register full pages ``start_page .. start_page + num_pages - 1`` of ``token_ids`` as
        evictable cached pages whose KV comes from elsewhere (a lower store tier).

        Pages already cached are skipped. The chain must be unbroken: when fewer than
        ``start_page`` leading pages are cached nothing is inserted. Takes free or evictable
        pages only (never the prefix it extends), stopping early when none is left; calls
        ``write(indices, pages)`` (indices into ``token_ids``' pages) before registering them.
        Returns how many pages were inserted.
        """
        if not self.enable_prefix_cache or start_page < 0 or num_pages <= 0:
            return 0
        ps = self.page_size
        end = min(start_page + num_pages, len(token_ids) // ps)
        prefix, hashes = self._match_prefix(token_ids, leave_one=False)
        if start_page > len(prefix):
            return 0
        # Pin the prefix so allocating the new pages cannot evict the chain they extend.
        for page in prefix:
            self._take_reference(page)
        indices: list[int] = []
        keys: list[tuple[PageKey, bytes]] = []
        for index, key, h in _chain(token_ids, ps, self.namespace, len(prefix), end, hashes[-1] if hashes else None):
            if h in self._hash_to_page:  # a collision with other content: the chain ends here
                break
            indices.append(index)
            keys.append((key, h))
        indices = indices[: len(self._free) + len(self._evictable)]
        evicted: list[tuple[int, bytes]] = []
        pages = [self._allocate_page(evicted) for _ in indices]
        try:
            self._emit_reclaimed(evicted)
            if pages:
                write(indices, pages)
        except BaseException:
            for page in pages:
                self._refcount[page] = 0
                self._free.appendleft(page)
            self._release(prefix)
            raise
        stored: list[bytes] = []
        for page, (key, h) in zip(pages, keys):
            self._hash_to_page[h] = page
            self._page_hash[page] = h
            self._page_key[page] = key
            stored.append(h)
        # Deepest first into the LRU, as free() does, so the chain is evicted from its tail.
        for page in reversed(pages):
            self._refcount[page] = 0
            self._evictable[page] = None
        self._release(prefix)
        self._emit("stored", stored)
        return len(pages)

    # ---- internals -----------------------------------------------------------------------

    def _take_reference(self, page: int) -> None:
        if self._refcount[page] == 0:
            del self._evictable[page]
        self._refcount[page] += 1

    def _release(self, pages: list[int]) -> None:
        # Tail pages first, so that among one sequence's pages the deepest prefix is evicted first.
        for page in reversed(pages):
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._page_hash:
                    self._evictable[page] = None
                else:
                    self._free.appendleft(page)

    def _allocate_page(self, evicted: list[tuple[int, bytes]]) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            h = self._page_hash.pop(page)
            del self._hash_to_page[h]
            del self._page_key[page]
            evicted.append((page, h))
        self._refcount[page] = 1
        return page

    def _emit_reclaimed(self, evicted: list[tuple[int, bytes]]) -> None:
        if not evicted:
            return
        pages = [page for page, _ in evicted]
        hashes = [h for _, h in evicted]
        if self.on_reclaim is not None:
            self.on_reclaim(pages, hashes)
        self._emit("evicted", hashes)

    def _emit(self, kind: str, hashes: list[bytes]) -> None:
        if hashes and self.on_event is not None:
            self.on_event(kind, hashes)

    # ---- introspection -------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        queried = self._prefix_query_tokens
        return {
            "pages_total": self.num_pages,
            "pages_free": len(self._free),
            "pages_evictable": len(self._evictable),
            "pages_available": self.num_free_pages,
            "pages_used": self.num_used_pages,
            "pages_cached": self.num_cached_pages,
            "prefix_queries": self._prefix_queries,
            "prefix_query_tokens": queried,
            "prefix_hit_tokens": self._prefix_hit_tokens,
            "prefix_hit_rate": self._prefix_hit_tokens / queried if queried else 0.0,
        }

    def check_integrity(self) -> None:
        """Assert every invariant of the pool; O(pages + page-table entries)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & self._evictable.keys(), "a page is both free and evictable"
        references: Counter[int] = Counter()
        for seq_id, seq in self._seqs.items():
            assert len(set(seq.pages)) == len(seq.pages), f"{seq_id!r} holds a page twice: {seq.pages}"
            assert seq.num_hashed <= len(seq.pages), f"{seq_id!r} hashed more pages than it holds"
            assert seq.num_computed <= len(seq.pages) * self.page_size, f"{seq_id!r} computed past its pages"
            if self.enable_prefix_cache:
                assert len(seq.hashes) == seq.num_hashed, f"{seq_id!r} has {len(seq.hashes)} hashes"
            references.update(seq.pages)
        for page in range(self.num_pages):
            rc = self._refcount[page]
            assert rc == references[page], f"page {page}: refcount {rc} but {references[page]} references"
            states = (page in free) + (page in self._evictable) + (rc > 0)
            assert states == 1, f"page {page} is in {states} states (free/evictable/referenced)"
            if page in free:
                assert page not in self._page_hash, f"free page {page} is still registered"
            if page in self._evictable:
                assert page in self._page_hash, f"evictable page {page} is not registered"
        assert sum(references.values()) == sum(self._refcount), "page table references out of range"
        assert len(self._hash_to_page) == len(self._page_hash) == len(self._page_key), "hash maps differ"
        for h, page in self._hash_to_page.items():
            assert self._page_hash.get(page) == h, f"hash->page->hash broken for page {page}"
            parent, tokens = self._page_key[page]
            assert len(tokens) == self.page_size, f"registered page {page} is not full"
            assert hash_page(parent, tokens, self.namespace) == h, f"page {page} hash does not match tokens"
