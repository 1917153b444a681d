"""Helpers shared by the quantized-matmul kernel tests."""

from __future__ import annotations

import jax.numpy as jnp

from kernels_pallas.quantized_matmul import SPLIT_STEPS


def split_bound(x, q):
    """The integer-dot paths' only approximation, x in a 15-bit fixed point: |y - x @ dequant(w)| <= step / 2 *
    sum_k |w[k, n]| per output with the row's step (a group's step is at most that), + float32 slack."""
    step = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True) / SPLIT_STEPS
    return step / 2 * jnp.sum(jnp.abs(q.dequantize(jnp.float32)), axis=0)[None, :] * 1.01 + 1e-5
