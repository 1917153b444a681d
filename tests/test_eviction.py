"""Eviction policies evict in the order their definitions say (hand-computed cases)."""

import pytest

from autoglm_jax.engine import BlockPool, LRUPolicy, PrefixCache, PriorityScorePolicy, make_policy, priority_score


def test_priority_score_formula():
    assert priority_score(0, 3, 3600) == 0
    assert priority_score(2, 1, None) == 2
    assert priority_score(1, 3, 3600) == 6
    assert priority_score(3, 2, 1800) == 9
    assert priority_score(1, 1, None, unbounded_ttl_s=7200) == 3


def _cached_pool(policy, specs):
    """Pages 1..n cached with (hit_count, priority, ttl) from ``specs``, freed in order 1..n."""
    pool = BlockPool(len(specs) + 1, policy=policy)
    cache = PrefixCache(pool, page_size=4)
    pages = pool.allocate(len(specs))
    for i, (p, (hits, prio, ttl)) in enumerate(zip(pages, specs)):
        cache.insert(p, bytes([i]), priority=prio, ttl_s=ttl)
        pool.pages[p].hit_count = hits
    pool.free(pages)
    return pool, cache, pages


SPECS = [  # (hit_count, priority, ttl_s) -> score
    (0, 3, 3600),   # A: 0
    (2, 1, None),   # B: 2
    (1, 3, 3600),   # C: 1 * 3 * 2 = 6
    (1, 1, 7200),   # D: 1 * 1 * 3 = 3
    (3, 2, 1800),   # E: 3 * 2 * 1.5 = 9
    (2, 1, 0.0),    # F: 2, tie with B, freed later
]


def test_priority_policy_evicts_lowest_score_first_ties_by_age():
    pool, cache, (a, b, c, d, e, f) = _cached_pool(PriorityScorePolicy(), SPECS)
    assert pool.evictable_page_ids() == [a, b, f, d, c, e]
    evicted = [pool.allocate(1)[0] for _ in range(6)]
    assert evicted == [a, b, f, d, c, e]
    assert pool.stats.evictions == 6 and len(cache) == 0


def test_lru_policy_evicts_least_recently_freed_first():
    pool, cache, (a, b, c, d, e, f) = _cached_pool(LRUPolicy(), SPECS)
    assert pool.evictable_page_ids() == [a, b, c, d, e, f]
    # a hit takes c out of the evictable set; freeing it again makes it the most recent
    pool.touch([c])
    assert pool.evictable_page_ids() == [a, b, d, e, f]
    pool.free([c])
    assert [pool.allocate(1)[0] for _ in range(6)] == [a, b, d, e, f, c]


def test_priority_policy_rescored_after_a_hit():
    pool, cache, (a, b, c, d, e, f) = _cached_pool(PriorityScorePolicy(), SPECS)
    pool.touch([a])
    cache.record_hit([a], priority=3)  # a: 1 hit * priority 3 * (1 + 1) = 6, freed after c -> after c
    pool.free([a])
    assert pool.evictable_page_ids() == [b, f, d, c, a, e]


def test_make_policy():
    assert isinstance(make_policy("lru"), LRUPolicy)
    assert isinstance(make_policy("priority"), PriorityScorePolicy)
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
