"""Partial rotary position embedding, exactly as Hugging Face applies it for GLM.

The first ``rotary_dim = H * partial_rotary_factor`` features of each head rotate, in interleaved pairs
``(x[2i], x[2i+1])`` with frequency ``theta ** (-2i / rotary_dim)``; the rest pass through unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(rotary_dim: int, theta: float) -> jax.Array:
    """[rotary_dim / 2] inverse frequencies, float32."""
    return 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))


def apply_rope(x: jax.Array, positions: jax.Array, *, rotary_dim: int, theta: float) -> jax.Array:
    """x: [B, T, heads, H]; positions: [B, T] int -> same shape and dtype as x.

    Like Hugging Face, cos/sin are computed in float32 and cast to x's dtype before the rotation.
    """
    inv_freq = rope_frequencies(rotary_dim, theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, rotary_dim/2]
    cos = jnp.cos(angles).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(angles).astype(x.dtype)[:, :, None, :]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = x_rot.reshape(*x_rot.shape[:-1], rotary_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x_rot.shape)
    return jnp.concatenate([rotated, x_pass], axis=-1) if x_pass.shape[-1] else rotated
