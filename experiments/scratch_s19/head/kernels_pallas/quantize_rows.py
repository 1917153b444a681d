"""GPU Pallas kernel (Triton lowering): W8A8's per-token dynamic activation quantization in one pass over x.

``quantize_rows(x[M, K]) -> (xq[M, K] int8, sx[M, 1] float32)`` with ``sx = absmax(x[m]) / 127`` (1 for an
all-zero row) and ``xq = clip(round(x / sx), -127, 127)``, round half to even: what the reference
``quant_formats.quantize_activations`` computes in plain ``jnp`` (XLA writes it as a row reduction and an
elementwise fusion, reading x twice). Here each program loads ``block_m`` whole rows once (K padded to a power
of two and masked), reduces, quantizes and stores. The quotients may differ from XLA's in the last ulp, so an
element within an ulp of a half step can round the other way (tests allow one step there).

Block sizes (keyword-only, static): ``block_m`` rows a program, ``num_warps``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .quant_formats import QuantFormatError


def round_half_even(v):
    """``jnp.round`` (half to even) from floor, which the Triton lowering has (it has no round)."""
    r = jnp.floor(v + 0.5)
    return jnp.where((r - v == 0.5) & (jnp.floor(r * 0.5) * 2.0 != r), r - 1.0, r)


def _kernel(x_ref, q_ref, s_ref, *, k, kp, rows, m):
    # x_ref [block_m, K] float; q_ref [block_m, K] int8; s_ref [block_m, 1] float32. Rows past M and columns
    # past K are masked.
    row_ok = pl.program_id(0) * rows + jnp.arange(rows) < m
    mask = row_ok[:, None] & (jnp.arange(kp) < k)[None, :]
    x = pltriton.load(x_ref.at[:, pl.ds(0, kp)], mask=mask, other=0.0).astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=1, keepdims=True)  # [block_m, 1]
    sx = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(round_half_even(x / sx), -127.0, 127.0).astype(jnp.int32).astype(jnp.int8)
    pltriton.store(q_ref.at[:, pl.ds(0, kp)], q, mask=mask)
    pltriton.store(s_ref, sx, mask=row_ok[:, None])


@functools.partial(jax.jit, static_argnames=("block_m", "num_warps", "interpret"))
def quantize_rows(x, *, block_m: int = 1, num_warps: int = 8, interpret: bool = False):
    """x [M, K] float -> (xq [M, K] int8, sx [M, 1] float32); see the module docstring."""
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise QuantFormatError(f"quantize_rows takes a float [M, K] array; got {x.dtype} {x.shape}")
    if block_m < 1 or block_m & (block_m - 1) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise QuantFormatError(f"block_m must be a power of two >= 1 and num_warps one of 1-32 (powers of two); "
                               f"got block_m={block_m}, num_warps={num_warps}")
    m, k = x.shape
    kp = 1 << max(0, (k - 1).bit_length())
    kernel = functools.partial(_kernel, k=k, kp=kp, rows=block_m, m=m)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(m, block_m),), in_specs=[pl.BlockSpec((block_m, k), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((block_m, k), lambda i: (i, 0)), pl.BlockSpec((block_m, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="w8a8_quantize_rows",
    )(x)
