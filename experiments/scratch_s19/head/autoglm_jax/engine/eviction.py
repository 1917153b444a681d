"""Which cached page to give up when the pool runs out of never-cached free pages.

A page is *evictable* when its reference count is 0 but it still holds a prefix-cache entry (its KV is
valid and a later request may map it). The block pool hands out uncached free pages first; only when none
is left does it ask the eviction policy for a victim, drops the victim's cache entry and reuses the page.

Policies see pages through four attributes (duck-typed, see ``block_pool.Page``): ``page_id``,
``hit_count`` (times a request mapped the page from the cache), ``priority`` (highest priority class 1-3
of the requests that used it) and ``ttl_s`` (the entry's time to live in seconds, or None).

* ``LRUPolicy``: least recently freed first (a page freed later was used later).
* ``PriorityScorePolicy``: the seed's score ``hit_count * priority_class * (1 + ttl / 3600)``, lowest
  first; ties go to the least recently freed page. The score of a page cannot change while it is
  evictable (a hit takes it out of the evictable set first), so it is computed once, on entry.

Every operation is O(1) (LRU) or O(log P) amortized (score heap with lazy deletion).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import heapq
import itertools


@dataclasses.dataclass
class CacheStats:
    """Counters of the prefix cache and the pool (mutable; ``Scheduler.stats()`` reports a snapshot)."""

    lookup_tokens: int = 0   # prompt tokens looked up in the prefix cache (at admission)
    hit_tokens: int = 0      # of those, tokens whose KV came from the cache
    evictions: int = 0       # cached pages reused for new data
    expirations: int = 0     # entries dropped because their TTL ran out
    invalidations: int = 0   # entries dropped by a model/version key change

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class EvictionPolicy(abc.ABC):
    """The set of evictable pages, ordered for eviction."""

    name: str = "base"

    @abc.abstractmethod
    def push(self, page) -> None:
        """``page`` became evictable (reference count 0, still cached)."""

    @abc.abstractmethod
    def discard(self, page_id: int) -> None:
        """``page_id`` is no longer evictable (mapped again, or its entry was dropped). No-op if absent."""

    @abc.abstractmethod
    def pop(self) -> int | None:
        """Removes and returns the next page to evict, or None when there is none."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __contains__(self, page_id: int) -> bool: ...

    @abc.abstractmethod
    def order(self) -> list[int]:
        """All evictable pages, first victim first (for tests and debugging; O(P log P))."""


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self):
        self._pages: collections.OrderedDict[int, None] = collections.OrderedDict()

    def push(self, page) -> None:
        self._pages[page.page_id] = None
        self._pages.move_to_end(page.page_id)

    def discard(self, page_id: int) -> None:
        self._pages.pop(page_id, None)

    def pop(self) -> int | None:
        return self._pages.popitem(last=False)[0] if self._pages else None

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, page_id: int) -> bool:
        return page_id in self._pages

    def order(self) -> list[int]:
        return list(self._pages)


def priority_score(hit_count: int, priority: int, ttl_s: float | None, *, unbounded_ttl_s: float = 0.0) -> float:
    """The seed's eviction score: ``hit_count * priority_class * (1 + ttl / 3600)``; lowest is evicted first.

    An entry without a TTL counts as ``ttl = unbounded_ttl_s`` (default 0: factor 1).
    """
    ttl = unbounded_ttl_s if ttl_s is None else ttl_s
    return hit_count * priority * (1.0 + ttl / 3600.0)


class PriorityScorePolicy(EvictionPolicy):
    name = "priority"

    def __init__(self, *, unbounded_ttl_s: float = 0.0):
        self.unbounded_ttl_s = unbounded_ttl_s
        self._heap: list[tuple[float, int, int]] = []  # (score, seq, page_id)
        self._live: dict[int, int] = {}                # page_id -> seq of its live heap entry
        self._seq = itertools.count()

    def score(self, page) -> float:
        return priority_score(page.hit_count, page.priority, page.ttl_s, unbounded_ttl_s=self.unbounded_ttl_s)

    def push(self, page) -> None:
        seq = next(self._seq)
        self._live[page.page_id] = seq
        heapq.heappush(self._heap, (self.score(page), seq, page.page_id))
        if len(self._heap) > 2 * len(self._live) + 64:  # drop stale entries now and then
            self._heap = [e for e in self._heap if self._live.get(e[2]) == e[1]]
            heapq.heapify(self._heap)

    def discard(self, page_id: int) -> None:
        self._live.pop(page_id, None)

    def pop(self) -> int | None:
        while self._heap:
            _, seq, page_id = heapq.heappop(self._heap)
            if self._live.get(page_id) == seq:
                del self._live[page_id]
                return page_id
        return None

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, page_id: int) -> bool:
        return page_id in self._live

    def order(self) -> list[int]:
        return [p for _, seq, p in sorted(self._heap) if self._live.get(p) == seq]


POLICIES = {"lru": LRUPolicy, "priority": PriorityScorePolicy}


def make_policy(name: str) -> EvictionPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; allowed: {sorted(POLICIES)}")
    return POLICIES[name]()
