"""Grouped-query attention math in plain ``jnp`` (the dense path; paged kernels live in ``kernels_pallas``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked (padding) rows stay NaN-free


KV_LAYOUTS = ("bskh", "bksh")


def gqa_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                  kv_layout: str = "bskh") -> jax.Array:
    """Softmax attention with query heads grouped over shared KV heads.

    q: [B, T, N, H]; k, v: [B, S, K, H] (``kv_layout="bskh"``) or [B, K, S, H] (``"bksh"``, a cache's layout);
    mask: [B, T, S] bool (True = attend) -> [B, T, N, H].
    Logits and softmax in float32; the probabilities are cast to v's dtype for the second product.
    """
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout {kv_layout!r}: expected one of {KV_LAYOUTS}")
    b, t, n, h = q.shape
    kv_heads = k.shape[kv_layout.index("k")]
    qg = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum(f"btkgh,{kv_layout}->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None, :, :], logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv_layout}->btkgh", probs, v)
    return out.reshape(b, t, n, h)


def causal_mask(t: int, s: int, offset: int = 0) -> jax.Array:
    """[T, S] bool: query t (at absolute index offset + t) sees keys 0..offset + t."""
    return jnp.arange(s)[None, :] <= (jnp.arange(t)[:, None] + offset)
