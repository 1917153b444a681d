"""Partial rotary position embedding, exactly as Hugging Face applies it for GLM.

The first ``rotary_dim = H * partial_rotary_factor`` features of each head rotate, in interleaved pairs
``(x[2i], x[2i+1])`` with frequency ``theta ** (-2i / rotary_dim)``; the rest pass through unchanged.
``rope_tables`` gives the same rotation as per-row [B, H] tables, the form the fused decode kernel applies.
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


def rope_tables(positions: jax.Array, *, head_dim: int, rotary_dim: int, theta: float, dtype) -> tuple:
    """positions [B] int -> (cos, sin) [B, head_dim] in ``dtype``: ``apply_rope`` as ``x * cos + swap(x) * sin``,
    ``swap`` exchanging features 2i and 2i+1 (``kernels_pallas.dense_decode_attention.rotate_pairs``).

    Pair i < rotary_dim / 2, angle a_i = position * inv_freq_i (float32, cast to dtype as ``apply_rope`` casts):
    cos[2i] = cos[2i+1] = cos(a_i), sin[2i] = -sin(a_i), sin[2i+1] = sin(a_i); features from rotary_dim on pass
    through (cos 1, sin 0).
    """
    angles = positions.astype(jnp.float32)[:, None] * rope_frequencies(rotary_dim, theta)  # [B, rotary_dim/2]
    cos = jnp.repeat(jnp.cos(angles), 2, axis=-1)
    sin = jnp.stack([-jnp.sin(angles), jnp.sin(angles)], axis=-1).reshape(cos.shape)
    rest = ((0, 0), (0, head_dim - rotary_dim))
    return jnp.pad(cos, rest, constant_values=1).astype(dtype), jnp.pad(sin, rest).astype(dtype)
