"""Token sampling on device: greedy, temperature, top-k and top-p, each row with its own settings and key."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, *, all_greedy: bool = False) -> jax.Array:
    """logits: [B, V] float32; keys: [B] PRNG keys; temperature, top_p: [B] float; top_k: [B] int -> [B] int32.

    A row with temperature 0 takes the argmax. Otherwise logits are divided by the temperature, tokens
    outside the top_k (0 = no limit) and outside the smallest set whose probability reaches top_p are
    dropped, and one token is drawn with the row's key. ``all_greedy`` (static) skips the sort.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if all_greedy:
        return greedy
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly before each sorted token
    keep_sorted = (before < top_p[:, None]) & (jnp.arange(v)[None, :] < k[:, None])
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    threshold = jnp.maximum(jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1), kth)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, masked).astype(jnp.int32)
    return jnp.where(temperature <= 0, greedy, drawn)
