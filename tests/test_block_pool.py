"""Block pool and prefix cache: page states, reference counts, hash-chain hits, version keys, TTL."""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm_jax.engine import (NULL_PAGE, BlockPool, LRUPolicy, OutOfPages, PrefixCache, PriorityScorePolicy,
                                chain_hash)

L = 4


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def check_invariants(pool: BlockPool, tables: dict, cache: PrefixCache | None = None):
    """Every page is exactly one of {null, free, evictable, in use}; ref counts = holders."""
    free, evictable = pool.free_page_ids(), pool.evictable_page_ids()
    assert len(free) == len(set(free)) and len(evictable) == len(set(evictable))
    holders = collections.Counter(p for t in tables.values() for p in t)
    for t in tables.values():
        assert len(t) == len(set(t)), "a block table holds a page twice"
    assert NULL_PAGE not in holders and NULL_PAGE not in free and NULL_PAGE not in evictable
    for p in range(1, pool.num_pages):
        states = [p in free, p in evictable, holders[p] > 0]
        assert sum(states) == 1, f"page {p} is in states {states}"
        assert pool.ref_count(p) == holders[p]
        cached = pool.pages[p].block_hash is not None
        if p in evictable:
            assert cached
        if p in free:
            assert not cached
    assert pool.num_free_pages == len(free) + len(evictable) == pool.num_pages - 1 - len(holders)
    if cache is not None:
        for h, p in cache._map.items():
            assert pool.pages[p].block_hash == h
        assert sum(pool.pages[p].block_hash is not None for p in range(1, pool.num_pages)) == len(cache)


def test_null_page_never_handed_out_and_failed_allocation_is_atomic():
    pool = BlockPool(5)
    pages = pool.allocate(4)
    assert sorted(pages) == [1, 2, 3, 4]
    with pytest.raises(OutOfPages):
        pool.allocate(1)
    pool.free(pages[:2])
    with pytest.raises(OutOfPages):
        pool.allocate(3)
    assert pool.num_free_pages == 2
    check_invariants(pool, {"a": pages[2:]})


def test_double_free_and_null_page_are_errors():
    pool = BlockPool(4)
    (p,) = pool.allocate(1)
    pool.free([p])
    with pytest.raises(ValueError, match="double free"):
        pool.free([p])
    with pytest.raises(ValueError, match="null page"):
        pool.free([NULL_PAGE])
    with pytest.raises(ValueError, match="free and uncached"):
        pool.touch([p])
    with pytest.raises(ValueError, match=">= 2"):
        BlockPool(1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.sampled_from(["lru", "priority"]), st.integers(3, 12))
def test_random_admit_grow_fork_free_evict_never_leaks(data, policy_name, num_pages):
    policy = LRUPolicy() if policy_name == "lru" else PriorityScorePolicy()
    pool = BlockPool(num_pages, policy=policy)
    cache = PrefixCache(pool, page_size=L, model_key="m")
    tables: dict[int, list[int]] = {}
    next_id, next_hash = 0, 0
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["admit", "grow", "fork", "free", "cache", "hit", "drop"]))
        ids = sorted(tables)
        if op == "admit":
            n = data.draw(st.integers(0, 3))
            if n <= pool.num_free_pages:
                tables[next_id] = pool.allocate(n)
                next_id += 1
            else:
                with pytest.raises(OutOfPages):
                    pool.allocate(n)
        elif op == "grow" and ids and pool.num_free_pages:
            tables[data.draw(st.sampled_from(ids))].extend(pool.allocate(1))
        elif op == "fork" and ids:
            src = tables[data.draw(st.sampled_from(ids))]
            pool.touch(src)
            tables[next_id] = list(src)
            next_id += 1
        elif op == "free" and ids:
            rid = data.draw(st.sampled_from(ids))
            pool.free(reversed(tables.pop(rid)))
        elif op == "cache" and ids:
            t = tables[data.draw(st.sampled_from(ids))]
            if t:
                page = data.draw(st.sampled_from(t))
                cache.insert(page, next_hash.to_bytes(8, "little"), priority=data.draw(st.integers(1, 3)),
                             ttl_s=data.draw(st.sampled_from([None, 60.0])))
                next_hash += 1
        elif op == "hit" and len(cache):
            h = data.draw(st.sampled_from(sorted(cache._map)))
            pages = cache.lookup([h])
            pool.touch(pages)
            cache.record_hit(pages, priority=2)
            tables[next_id] = pages
            next_id += 1
        elif op == "drop" and len(cache):
            cache.set_model_key(f"m{next_hash}")
            next_hash += 1
        check_invariants(pool, tables, cache)
    for rid in list(tables):
        pool.free(reversed(tables.pop(rid)))
    check_invariants(pool, tables, cache)
    assert pool.num_used_pages == 0


def test_allocate_prefers_uncached_pages_then_evicts_and_drops_the_entry():
    pool = BlockPool(4)
    cache = PrefixCache(pool, page_size=L)
    a, b, c = pool.allocate(3)
    cache.insert(a, b"ha", priority=1)
    pool.free([a, b, c])  # a stays cached (evictable), b and c are plain free
    assert pool.evictable_page_ids() == [a] and pool.free_page_ids() == [b, c]
    assert sorted(pool.allocate(2)) == sorted([b, c])
    assert pool.stats.evictions == 0 and cache.lookup([b"ha"]) == [a]
    assert pool.allocate(1) == [a]
    assert pool.stats.evictions == 1 and cache.lookup([b"ha"]) == [] and len(cache) == 0


def _seq_hashes(cache, tokens):
    return cache.extend_hashes([], tokens)


def test_longest_full_page_prefix_is_mapped():
    pool = BlockPool(16)
    cache = PrefixCache(pool, page_size=L, model_key="ckpt-1")
    seq_a = list(range(100, 114))  # 3 full pages + 2 tokens
    hashes_a = _seq_hashes(cache, seq_a)
    assert len(hashes_a) == 3  # the partial page is not hashed
    pages_a = pool.allocate(4)
    for p, h in zip(pages_a, hashes_a):
        assert cache.insert(p, h, priority=1)
    seq_b = seq_a[:8] + [7, 7, 7, 7, 7]  # shares two full pages, differs in the third
    assert cache.lookup(_seq_hashes(cache, seq_b)) == pages_a[:2]
    assert cache.lookup(_seq_hashes(cache, seq_a + [1, 2])) == pages_a[:3]
    # same tokens in the third page but a different first page: the chain gives no hit at all
    seq_c = [0, 0, 0, 0] + seq_a[4:]
    assert cache.lookup(_seq_hashes(cache, seq_c)) == []
    # a duplicate insertion of the same prefix is refused
    (other,) = pool.allocate(1)
    assert not cache.insert(other, hashes_a[0], priority=1)


def test_chain_hash_depends_on_parent_tokens_and_key():
    h = chain_hash(None, [1, 2, 3, 4], "k")
    assert h != chain_hash(None, [1, 2, 3, 5], "k")
    assert h != chain_hash(None, [1, 2, 3, 4], "k2")
    assert chain_hash(h, [1, 2, 3, 4], "k") != h
    assert h == chain_hash(None, (1, 2, 3, 4), "k")


def test_version_key_change_gives_no_hits():
    pool = BlockPool(8)
    cache = PrefixCache(pool, page_size=L, model_key="v1")
    tokens = list(range(8))
    pages = pool.allocate(2)
    for p, h in zip(pages, _seq_hashes(cache, tokens)):
        cache.insert(p, h, priority=1)
    pool.free(reversed(pages))
    assert pool.num_evictable_pages == 2
    cache.set_model_key("v2")
    assert cache.lookup(_seq_hashes(cache, tokens)) == []
    assert pool.num_evictable_pages == 0 and sorted(pool.free_page_ids()) == list(range(1, 8))
    assert pool.stats.invalidations == 2
    # a cache built with the other key from the start cannot match either
    other = PrefixCache(BlockPool(8), page_size=L, model_key="v1")
    assert _seq_hashes(other, tokens) != _seq_hashes(cache, tokens)


def test_ttl_expiry():
    clock = FakeClock()
    pool = BlockPool(8)
    cache = PrefixCache(pool, page_size=L, default_ttl_s=10.0, clock=clock)
    hashes = _seq_hashes(cache, list(range(8)))
    p1, p2 = pool.allocate(2)
    cache.insert(p1, hashes[0], priority=1)             # default TTL 10 s
    cache.insert(p2, hashes[1], priority=1, ttl_s=100.0)
    clock.t += 9.99
    assert cache.lookup(hashes) == [p1, p2]
    clock.t += 0.01
    assert cache.lookup(hashes) == []  # the first link expired, so nothing after it is reachable
    assert pool.stats.expirations == 1 and len(cache) == 1
    pool.free([p2, p1])
    assert pool.evictable_page_ids() == [p2] and pool.is_free(p1)
    clock.t += 100
    assert cache.expire() == 1 and len(cache) == 0 and pool.is_free(p2)
