"""The paged KV cache layout, writing tokens into pages, int8 page quantization, and page-table checks.

Layout (one pool per layer)::

    k_pages, v_pages : [K, P, L, H]   kv heads, pages, page size (tokens per page), head_dim
    k_scales, v_scales: [K, P, L]     float32, only for int8 pages (one scale per token per kv head)

Why this layout: a decode step for sequence ``b`` and kv head ``k`` streams the pages
``page_table[b, :]`` of that head. With the kv head outermost, one page of one head is a single
contiguous run of ``L * H`` elements (4 KiB for L=16, H=128, bf16), so a page is read with fully
coalesced 16-byte vector loads and every byte read is used; the G query heads that share the kv head
(G = N / K, 16 for GLM-4-9B) all consume that one load. Scales sit in their own [K, P, L] array so
int8 pages stay 128-byte rows (H = 128) and the scales of one page are one contiguous run of L floats.

Slots: token ``t`` of the pool lives at ``slot = page * L + offset``. Page 0 may be a null page that the
engine reserves; nothing here assumes it. Page-table entries past a sequence's last page are never read
for their contents (the kernels replace them by page 0 before gathering), so they may hold anything.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def page_geometry(k_pages, v_pages, k_scales=None, v_scales=None) -> tuple[int, int, int, int]:
    """Static checks on a page pool; returns (K, P, L, H). Raises ValueError naming what is wrong."""
    if k_pages.ndim != 4:
        raise ValueError(f"k_pages must be [K, P, L, H]; got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}")
    if v_pages.dtype != k_pages.dtype:
        raise ValueError(f"v_pages dtype {v_pages.dtype} must equal k_pages dtype {k_pages.dtype}")
    kv_heads, pages, page_size, head_dim = k_pages.shape
    if pages < 1 or kv_heads < 1:
        raise ValueError(f"the pool needs at least one page and one kv head; got shape {k_pages.shape}")
    quantized = k_pages.dtype == jnp.int8
    if (k_scales is None) != (v_scales is None):
        raise ValueError("pass both k_scales and v_scales, or neither")
    if quantized and k_scales is None:
        raise ValueError("int8 pages need k_scales and v_scales [K, P, L] float32")
    if not quantized and k_scales is not None:
        raise ValueError(f"scales are only for int8 pages; the pages are {k_pages.dtype}")
    if k_scales is not None:
        for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
            if s.shape != (kv_heads, pages, page_size):
                raise ValueError(f"{name} must be [K, P, L] = {(kv_heads, pages, page_size)}; got {s.shape}")
            if s.dtype != jnp.float32:
                raise ValueError(f"{name} must be float32; got {s.dtype}")
    return kv_heads, pages, page_size, head_dim


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 quantization over the last axis (head_dim): one scale per token per head.

    x [..., H] -> (q int8 [..., H], scale float32 [...]) with x ~= q * scale; scale = max|x| / 127
    (an all-zero vector gets scale 1, so the scale is never zero and dequantization is exact).
    """
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(xf / scale[..., None]), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of ``quantize_kv``: q [..., H] int8, scale [...] -> [..., H] in ``dtype``."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


def write_kv_pages(k_pages, v_pages, k_new, v_new, slot_mapping, *, k_scales=None, v_scales=None):
    """Writes new tokens' k/v [T, K, H] into their slots (slot = page * L + offset; negative = skip).

    Returns (k_pages, v_pages) or, for int8 pages, (k_pages, v_pages, k_scales, v_scales), the new
    tokens quantized per token per head. Donate the page buffers under jit to update them in place.
    """
    kv_heads, pages, page_size, head_dim = page_geometry(k_pages, v_pages, k_scales, v_scales)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.ndim != 3 or x.shape[1:] != (kv_heads, head_dim):
            raise ValueError(f"{name} must be [T, K, H] with K={kv_heads}, H={head_dim}; got {x.shape}")
    if slot_mapping.shape != (k_new.shape[0],) or v_new.shape[0] != k_new.shape[0]:
        raise ValueError(f"slot_mapping must be [T] = ({k_new.shape[0]},) like k_new/v_new; "
                         f"got {slot_mapping.shape}, v_new {v_new.shape}")
    if not jnp.issubdtype(slot_mapping.dtype, jnp.integer):
        raise ValueError(f"slot_mapping must be integer; got {slot_mapping.dtype}")
    slot = slot_mapping.astype(jnp.int32)
    # Skipped tokens get page index P (out of range) and are dropped by the scatter.
    page = jnp.where(slot >= 0, slot // page_size, pages)
    offset = jnp.where(slot >= 0, slot % page_size, 0)
    k_t = jnp.swapaxes(k_new, 0, 1)  # [K, T, H]
    v_t = jnp.swapaxes(v_new, 0, 1)
    if k_scales is None:
        k_pages = k_pages.at[:, page, offset].set(k_t.astype(k_pages.dtype), mode="drop")
        v_pages = v_pages.at[:, page, offset].set(v_t.astype(v_pages.dtype), mode="drop")
        return k_pages, v_pages
    kq, ks = quantize_kv(k_t)
    vq, vs = quantize_kv(v_t)
    k_pages = k_pages.at[:, page, offset].set(kq, mode="drop")
    v_pages = v_pages.at[:, page, offset].set(vq, mode="drop")
    k_scales = k_scales.at[:, page, offset].set(ks, mode="drop")
    v_scales = v_scales.at[:, page, offset].set(vs, mode="drop")
    return k_pages, v_pages, k_scales, v_scales


def _is_concrete(*xs) -> bool:
    return all(not isinstance(x, jax.core.Tracer) for x in xs)


def validate_page_table(page_table, context_lens, *, num_pages: int, page_size: int, num_seqs=None) -> None:
    """Host-side check of concrete page tables; raises ValueError describing the first problem.

    page_table [B, max_pages] int32, context_lens [B] int32 (keys each sequence attends to). Checks:
    lengths in 0..max_pages * page_size, and every page a sequence uses (the first
    ceil(len / page_size) entries of its row) in 0..num_pages-1. Rows at or past ``num_seqs`` are
    not checked. The kernel wrappers call this when their inputs are concrete (not traced).
    """
    pt = np.asarray(page_table)
    lens = np.asarray(context_lens).reshape(-1)
    if pt.ndim != 2 or lens.shape[0] != pt.shape[0]:
        raise ValueError(f"page_table must be [B, max_pages] and lengths [B]; got {pt.shape}, {lens.shape}")
    rows = pt.shape[0] if num_seqs is None else int(np.asarray(num_seqs).reshape(-1)[0])
    if not 0 <= rows <= pt.shape[0]:
        raise ValueError(f"num_seqs={rows} must be in 0..{pt.shape[0]}")
    max_len = pt.shape[1] * page_size
    for b in range(rows):
        n = int(lens[b])
        if n < 0 or n > max_len:
            raise ValueError(f"length {n} of sequence {b} is outside 0..{max_len} "
                             f"(= max_pages {pt.shape[1]} * page size {page_size})")
        used = pt[b, : -(-n // page_size)]
        bad = np.nonzero((used < 0) | (used >= num_pages))[0]
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"page_table[{b}, {j}] = {int(used[j])} points outside the pool of "
                             f"{num_pages} pages (sequence {b} has length {n}, uses {used.size} pages)")
