"""The pool of fixed-size KV pages, host side: who holds which page, and which page to hand out next.

Pages are numbered ``0 .. P-1`` and index the device arrays ``[K, P, L, H]`` of the paged cache.
Page 0 is the *null page*: never handed out, used to pad block tables (its contents are garbage).

Every other page is in exactly one state:

* **in use**: ``ref_count >= 1`` (that many block tables hold it; a page shared by a prefix hit or a
  fork has ``ref_count > 1``);
* **free**: ``ref_count == 0`` and not cached -- in ``_free``, a FIFO (oldest freed first);
* **evictable**: ``ref_count == 0`` and still cached (a prefix-cache entry maps its hash to it) -- in
  the eviction policy's ordered set; a prefix hit takes it back (``touch``) in O(1).

``allocate`` takes free pages first and evicts only when none is left, so cached prefixes live as long
as the memory is not needed. This mirrors vLLM v1's free block queue, with the eviction order made
pluggable (``eviction.py``) instead of fixed to LRU.
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable

from .eviction import CacheStats, EvictionPolicy, LRUPolicy

NULL_PAGE = 0


class OutOfPages(RuntimeError):
    """Fewer free pages than asked for; nothing was allocated."""


class Page:
    __slots__ = ("page_id", "ref_count", "block_hash", "hit_count", "priority", "ttl_s", "expires_at")

    def __init__(self, page_id: int):
        self.page_id = page_id
        self.ref_count = 0
        self.block_hash: bytes | None = None  # set while a prefix-cache entry maps to this page
        self.hit_count = 0          # prefix-cache hits since the entry was made
        self.priority = 1           # highest priority class of the requests that used the entry
        self.ttl_s: float | None = None
        self.expires_at: float | None = None

    def reset_entry(self) -> None:
        self.block_hash = None
        self.hit_count = 0
        self.priority = 1
        self.ttl_s = None
        self.expires_at = None

    def __repr__(self) -> str:
        return f"Page({self.page_id}, ref={self.ref_count}, cached={self.block_hash is not None})"


class BlockPool:
    """Reference-counted pages with a free FIFO and an evictable set ordered by an eviction policy."""

    def __init__(self, num_pages: int, *, policy: EvictionPolicy | None = None, stats: CacheStats | None = None):
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"num_pages={num_pages!r} must be an integer >= 2 (page 0 is the reserved null page)")
        self.num_pages = num_pages
        self.pages = [Page(i) for i in range(num_pages)]
        self.pages[NULL_PAGE].ref_count = 1  # permanently held; never freed, never handed out
        self._free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.policy = policy if policy is not None else LRUPolicy()
        self.stats = stats if stats is not None else CacheStats()
        # Called with (page_id, block_hash) when a cached page is evicted, so the prefix cache drops the entry.
        self.on_evict: Callable[[int, bytes], None] | None = None

    # ---- queries ---------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        """Pages ``allocate`` can hand out now (free + evictable)."""
        return len(self._free) + len(self.policy)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - 1 - self.num_free_pages

    @property
    def num_evictable_pages(self) -> int:
        return len(self.policy)

    @property
    def usage(self) -> float:
        return self.num_used_pages / (self.num_pages - 1)

    def ref_count(self, page_id: int) -> int:
        return self.pages[page_id].ref_count

    def is_free(self, page_id: int) -> bool:
        """Free and uncached (in the FIFO)."""
        return self.pages[page_id].ref_count == 0 and page_id not in self.policy

    def is_evictable(self, page_id: int) -> bool:
        return page_id in self.policy

    def free_page_ids(self) -> list[int]:
        return list(self._free)

    def evictable_page_ids(self) -> list[int]:
        """Evictable pages, next victim first."""
        return self.policy.order()

    # ---- allocation --------------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Hands out ``n`` pages with ``ref_count = 1``: free pages first, then evicted ones.

        Raises ``OutOfPages`` (allocating nothing) if fewer than ``n`` are available.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free_pages:
            raise OutOfPages(f"asked for {n} pages, {self.num_free_pages} free of {self.num_pages - 1}")
        out = []
        for _ in range(n):
            if self._free:
                page_id = self._free.popleft()
            else:
                page_id = self.policy.pop()
                self._evict(page_id)
            page = self.pages[page_id]
            assert page.ref_count == 0 and page.block_hash is None, page
            page.ref_count = 1
            out.append(page_id)
        return out

    def _evict(self, page_id: int) -> None:
        page = self.pages[page_id]
        block_hash = page.block_hash
        page.reset_entry()
        self.stats.evictions += 1
        if self.on_evict is not None and block_hash is not None:
            self.on_evict(page_id, block_hash)

    def touch(self, page_ids: Iterable[int]) -> None:
        """One more block table holds each page (a prefix hit or a fork). Evictable pages come back in use."""
        for page_id in page_ids:
            page = self.pages[page_id]
            if page_id == NULL_PAGE:
                raise ValueError("the null page cannot be shared")
            if page.ref_count == 0:
                if page_id not in self.policy:
                    raise ValueError(f"page {page_id} is free and uncached; only cached or in-use pages can be "
                                     "shared")
                self.policy.discard(page_id)
            page.ref_count += 1

    def free(self, page_ids: Iterable[int]) -> None:
        """One block table fewer holds each page. Pass a request's pages in eviction order (tail first)."""
        for page_id in page_ids:
            page = self.pages[page_id]
            if page_id == NULL_PAGE:
                raise ValueError("the null page cannot be freed")
            if page.ref_count <= 0:
                raise ValueError(f"page {page_id} freed more often than allocated (double free)")
            page.ref_count -= 1
            if page.ref_count == 0:
                if page.block_hash is not None:
                    self.policy.push(page)
                else:
                    self._free.append(page_id)

    # ---- cache entries (used by PrefixCache) ------------------------------------------------------
    def set_entry(self, page_id: int, block_hash: bytes, *, priority: int, ttl_s: float | None,
                  now: float) -> None:
        """Marks an in-use page as holding the cache entry ``block_hash``."""
        page = self.pages[page_id]
        if page.ref_count < 1 or page_id == NULL_PAGE:
            raise ValueError(f"only an in-use page can be cached, page {page_id} has ref_count {page.ref_count}")
        page.block_hash = block_hash
        page.hit_count = 0
        page.priority = priority
        page.ttl_s = ttl_s
        page.expires_at = None if ttl_s is None else now + ttl_s

    def drop_entry(self, page_id: int) -> None:
        """Forgets the page's cache entry; an evictable page becomes plain free."""
        page = self.pages[page_id]
        page.reset_entry()
        if page.ref_count == 0 and page_id in self.policy:
            self.policy.discard(page_id)
            self._free.append(page_id)
