"""The split-K combine of decode attention's partial outputs, optionally writing o_proj's digit planes too.

A decode kernel with ``splits`` programs per (row, KV head) writes each split's normalized partial output and its
log-sum-exp: o [B, K, splits, G16, H] float32 (rows past the G query heads of a KV head: padding), lse [B, K,
splits, G16] (natural log; an empty split has lse = -1e30 and weighs nothing). The combined output is

    out = sum_s e^(lse_s - M) o_s / sum_s e^(lse_s - M),  M = max_s lse_s

``combine_reference`` writes it in XLA's ops (the dense decode kernel's combine). ``combine_planes`` writes it in one
Pallas launch (Triton lowering; interpret mode on the CPU) for one row (B = 1) and, beside out, the int4 / int8
integer-dot GEMV's digit planes of out as o_proj takes it (``act_digits``, group G = H: one head's H outputs are
one group, their step its absmax / ``SPLIT_STEPS``): at batch 1 o_proj's digit prep is a launch of its own
(1.3 us a layer for int4 on the H100, session 24's decode profile), which this folds into the combine that runs
anyway. Program k (grid (K,)) takes KV head k: an online combine over the splits (running max, rescaled sums), each
half of H accumulated apart (the planes' two halves), out rounded to its dtype before its digits are taken.
Needs G = G16 (the GLM-4 shapes: 16 query heads a KV head), so that each program's rows are whole heads of out.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .act_digits import digit_out_shapes, pack, store_planes

MASK_VALUE = -1e30


def combine_reference(o, lse):
    """o [B, K, splits, G, H] float32, lse [B, K, splits, G] -> [B, K, G, H] float32 (log-sum-exp weighted mean)."""
    m = jnp.max(lse, axis=2, keepdims=True)
    w = jnp.exp(lse - m)
    return jnp.sum(o * w[..., None], axis=2) / jnp.sum(w, axis=2)[..., None]


def _kernel(o_ref, lse_ref, out_ref, planes_ref, xg_ref, step_ref, *, splits: int, rows: int, interpret: bool):
    # o_ref [splits, G, H] float32 and lse_ref [splits, G]: KV head k's partials; out_ref [N, H] (the whole output,
    # this program's rows k G ..); planes_ref [4, N, H/2], xg_ref / step_ref [N] (act_digits' planes, G = H).
    h2 = o_ref.shape[2] // 2

    def body(s, carry):
        m, l, lo, hi = carry
        ls = lse_ref[pl.ds(s, 1), :].reshape(rows)
        m_new = jnp.maximum(m, ls)
        alpha, w = jnp.exp(m - m_new), jnp.exp(ls - m_new)
        part = [o_ref[pl.ds(s, 1), :, pl.ds(j * h2, h2)].reshape(rows, h2) for j in range(2)]
        return (m_new, l * alpha + w, lo * alpha[:, None] + w[:, None] * part[0],
                hi * alpha[:, None] + w[:, None] * part[1])

    zeros = jnp.zeros((rows, h2), jnp.float32)
    m, l, lo, hi = lax.fori_loop(0, splits, body, (jnp.full((rows,), MASK_VALUE, jnp.float32),
                                                   jnp.zeros((rows,), jnp.float32), zeros, zeros))
    inv = 1.0 / jnp.maximum(l, 1e-30)[:, None]
    row0 = pl.program_id(0) * rows
    halves = []
    for j, acc in enumerate((lo, hi)):
        y = (acc * inv).astype(out_ref.dtype)
        out_ref[pl.ds(row0, rows), pl.ds(j * h2, h2)] = y
        halves.append(y.astype(jnp.float32))
    store_planes(planes_ref, xg_ref, step_ref, halves, jnp.ones((rows,), jnp.bool_), row0, interpret)


def combine_planes(o, lse, *, dtype, num_warps: int = 4, interpret: bool = False):
    """o [1, K, splits, G, H] float32, lse [1, K, splits, G] -> (out [1, K G, H] in ``dtype``, ``ActDigits`` of
    out viewed [1, K G H] in the planes layout of group H). G must be a power of two (no padded rows) and H even."""
    b, kh, splits, rows, h = o.shape
    if b != 1 or lse.shape != o.shape[:4] or rows & (rows - 1) or h % 2:
        raise ValueError(f"combine_planes takes one row's partials o [1, K, splits, G, H] (G a power of two, H even) "
                         f"and lse [1, K, splits, G]; got o {o.shape}, lse {lse.shape}")
    n = kh * rows
    digit_shapes = digit_out_shapes(1, n * h, h)
    full = lambda shape: pl.BlockSpec(shape, lambda k: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_kernel, splits=splits, rows=rows, interpret=interpret)
    out, *digits = pl.pallas_call(
        kernel, grid=(kh,),
        in_specs=[pl.BlockSpec((None, None, splits, rows, h), lambda k: (0, k, 0, 0, 0)),
                  pl.BlockSpec((None, None, splits, rows), lambda k: (0, k, 0, 0))],
        out_specs=[full((n, h))] + [full(s.shape) for s in digit_shapes],
        out_shape=[jax.ShapeDtypeStruct((n, h), dtype)] + digit_shapes,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="decode_combine_planes",
    )(o, lse)
    return out[None], pack(digits, 1, n * h, h)


