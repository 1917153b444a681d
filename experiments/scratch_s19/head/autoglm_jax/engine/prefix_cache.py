"""Prefix reuse: full pages of KV keyed by a hash chain, so a new request maps its longest cached prefix.

The key of page i of a token sequence is ``hash(key of page i-1, model_key, tokens of page i)``: it names
the whole prefix up to the end of the page, not just the page's own tokens, so equal keys mean equal KV.
``model_key`` is the checkpoint/version (e.g. a checkpoint digest + dtype); changing it (``set_model_key``)
drops every entry, and keys made under the old version can never match the new one.

Only full pages are cached; a page is inserted after the step that wrote its last token (``Scheduler.update``),
so every entry holds finished KV. Entries may carry a TTL; an expired entry is dropped when a lookup reaches
it. Cached pages whose reference count falls to 0 stay in the pool as *evictable* until reused or evicted.

Hashes are 128-bit BLAKE2b digests of a fixed byte encoding, stable across processes.
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Callable, Sequence

from .block_pool import BlockPool


def chain_hash(parent: bytes | None, tokens: Sequence[int], model_key: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else b"\x00root")
    key = model_key.encode()
    h.update(struct.pack("<I", len(key)))
    h.update(key)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


class PrefixCache:
    """Maps hash-chain keys to pages of ``pool``."""

    def __init__(self, pool: BlockPool, *, page_size: int, model_key: str = "", default_ttl_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.pool = pool
        self.page_size = page_size
        self.model_key = model_key
        self.default_ttl_s = default_ttl_s
        self.clock = clock
        self.stats = pool.stats
        self._map: dict[bytes, int] = {}
        pool.on_evict = self._on_evict

    def __len__(self) -> int:
        return len(self._map)

    def _on_evict(self, page_id: int, block_hash: bytes) -> None:
        if self._map.get(block_hash) == page_id:
            del self._map[block_hash]

    # ---- hashing ---------------------------------------------------------------------------------
    def extend_hashes(self, hashes: list[bytes], tokens: Sequence[int]) -> list[bytes]:
        """Appends to ``hashes`` the keys of the full pages of ``tokens`` not hashed yet; returns ``hashes``."""
        L = self.page_size
        for i in range(len(hashes), len(tokens) // L):
            parent = hashes[i - 1] if i else None
            hashes.append(chain_hash(parent, tokens[i * L:(i + 1) * L], self.model_key))
        return hashes

    # ---- lookup / insert -------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Pages of the longest cached prefix of ``hashes`` (stops at the first miss or expired entry).

        Does not take references: the caller ``pool.touch``-es the pages it keeps (then ``record_hit``).
        """
        now = self.clock()
        pages = []
        for h in hashes:
            page_id = self._map.get(h)
            if page_id is None:
                break
            page = self.pool.pages[page_id]
            if page.expires_at is not None and now >= page.expires_at:
                self._drop(h, page_id)
                self.stats.expirations += 1
                break
            pages.append(page_id)
        return pages

    def record_hit(self, page_ids: Sequence[int], *, priority: int) -> None:
        for page_id in page_ids:
            page = self.pool.pages[page_id]
            page.hit_count += 1
            page.priority = max(page.priority, priority)

    def insert(self, page_id: int, block_hash: bytes, *, priority: int, ttl_s: float | None = None) -> bool:
        """Caches in-use page ``page_id`` under ``block_hash``. Returns False (and caches nothing) if the key
        already maps to a page (the same prefix computed twice) or the page already holds an entry."""
        if block_hash in self._map or self.pool.pages[page_id].block_hash is not None:
            return False
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        self.pool.set_entry(page_id, block_hash, priority=priority, ttl_s=ttl, now=self.clock())
        self._map[block_hash] = page_id
        return True

    def _drop(self, block_hash: bytes, page_id: int) -> None:
        del self._map[block_hash]
        self.pool.drop_entry(page_id)

    def expire(self) -> int:
        """Drops every expired entry now (O(entries)); returns how many."""
        now = self.clock()
        dead = [(h, p) for h, p in self._map.items()
                if self.pool.pages[p].expires_at is not None and now >= self.pool.pages[p].expires_at]
        for h, p in dead:
            self._drop(h, p)
        self.stats.expirations += len(dead)
        return len(dead)

    def set_model_key(self, model_key: str) -> None:
        """A new checkpoint/version: every entry is dropped (their pages become free or stay in use uncached)."""
        if model_key == self.model_key:
            return
        self.stats.invalidations += len(self._map)
        for h, p in list(self._map.items()):
            self._drop(h, p)
        self.model_key = model_key
