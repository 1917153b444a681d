"""Helpers shared by the quantized-matmul kernel tests."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from kernels_pallas.quant_formats import quantize
from kernels_pallas.quantized_matmul import SPLIT_STEPS


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def problem(seed, m, k, n, fmt, kw, x_dtype=jnp.bfloat16):
    """Fresh random x [M, K], float w [K, N] and its quantized form (one jit: fast on a busy CPU)."""
    @jax.jit
    def make(key):
        kx, kw_ = jax.random.split(key)
        w = 0.05 * jax.random.normal(kw_, (k, n), jnp.float32) + 0.01  # offset: asymmetric ranges
        x = jax.random.normal(kx, (m, k), jnp.float32).astype(x_dtype)
        return x, quantize(w, fmt, **kw), w
    return make(jax.random.key(seed))


def split_bound(x, q):
    """The integer-dot paths' only approximation, x in a 15-bit fixed point: |y - x @ dequant(w)| <= step / 2 *
    sum_k |w[k, n]| per output with the row's step (a group's step is at most that), + float32 slack."""
    step = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1, keepdims=True) / SPLIT_STEPS
    return step / 2 * jnp.sum(jnp.abs(q.dequantize(jnp.float32)), axis=0)[None, :] * 1.01 + 1e-5
