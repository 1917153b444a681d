"""GPU Pallas kernels (Triton lowering): an activation's per-row fixed point in one pass over x.

``split_rows`` writes the two int8 digits of the ``xla_split`` int8 path (see its docstring); the rest of this
docstring is about ``quantize_rows``, W8A8's per-token dynamic activation quantization.

``quantize_rows(x[M, K]) -> (xq[M, K] int8, sx[M, 1] float32)`` with ``sx = absmax(x[m]) / 127`` (1 for an
all-zero row) and ``xq = clip(round(x / sx), -127, 127)``, round half to even: what the reference
``quant_formats.quantize_activations`` computes in plain ``jnp`` (XLA writes it as a row reduction and an
elementwise fusion, reading x twice). Here each program loads ``block_m`` whole rows once, as ``block_k``-wide
chunks (the last masked; the default, one chunk of the row padded to a power of two, was fastest on the H100
although it pads K = 13696 to 16384), reduces, quantizes and stores. It is instruction-bound rather than
bandwidth-bound on the H100, so the element loop is kept short: the quotient x / sx from sx's reciprocal with one
FMA correction and one PTX ``cvt.rni`` for the round half to even (``round_quotient``, five instructions a element
instead of an IEEE division and a floor-based rounding): the correctly rounded quotient, which XLA's form of the
reference may miss by one step on a few elements (it can multiply by a reciprocal; 1.2e-4 of them at W8A8's down
shape on the H100).

Block sizes (keyword-only, static): ``block_m`` rows a program, ``block_k`` columns a chunk, ``num_warps``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .quant_formats import QuantFormatError


def round_to_int(v, interpret: bool):
    """float32 -> int32, rounded half to even: one PTX ``cvt.rni.s32.f32`` a element on the GPU, ``jnp.round``
    in interpret mode."""
    if interpret:
        return jnp.round(v).astype(jnp.int32)
    return pltriton.elementwise_inline_asm("cvt.rni.s32.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.int32)])[0]


def reciprocal(v, interpret: bool):
    """1 / v correctly rounded (PTX ``rcp.rn.f32``; ``round_quotient`` needs its ``inv`` so), for the few
    per-row scalars that take it."""
    if interpret:
        return 1.0 / v
    return pltriton.elementwise_inline_asm("rcp.rn.f32 $0, $1;", args=[v], constraints="=r,r", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, jnp.float32)])[0]


_QUOTIENT_ASM = """{
.reg .f32 q, n, r;
mul.rn.f32 q, $1, $3;
neg.f32 n, q;
fma.rn.f32 r, n, $2, $1;
fma.rn.f32 q, r, $3, q;
cvt.rni.s32.f32 $0, q;
}"""
# $1 x, $2 the divisor d, $3 inv = RN(1 / d): q = RN(x inv) is within an ulp of x / d, r = x - q d is exact (FMA),
# and RN(q + r inv) is x / d correctly rounded (Markstein's theorem), then rounded half to even to an integer.


def round_quotient(x, d, inv, interpret: bool):
    """``round(x / d)`` (the float32 quotient correctly rounded, as IEEE division gives it, then half to even) as
    int32, in five PTX instructions a element from ``inv = reciprocal(d)`` (one Newton step with FMAs, not the IEEE
    division's longer sequence); ``d`` and ``inv`` broadcast against x. XLA's own ``jnp.round(x / d)`` on the GPU may
    differ by one on a few elements (it may multiply by a reciprocal: 1.2e-4 of W8A8's down activations)."""
    if interpret:
        return jnp.round(x / d).astype(jnp.int32)
    d, inv = (jnp.broadcast_to(v, x.shape) for v in (d, inv))
    return pltriton.elementwise_inline_asm(_QUOTIENT_ASM, args=[x, d, inv], constraints="=r,r,r,r", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])[0]


def split_values(x, step, inv, steps: int, interpret: bool):
    """x's fixed point in ``steps`` steps of ``step`` (``inv = reciprocal(step)``), as two digits: (xs, hi, lo) int32
    with ``xs = clip(round(x / step), -steps, steps) = 128 hi + lo``, ``hi = round(xs / 128)`` (exact: a power of
    two). The xla_split path's digits (``split_rows``) and the int4 dp4a GEMV's (``qmatmul_dp4a``) both."""
    xs = jnp.clip(round_quotient(x, step, inv, interpret), -steps, steps)
    hi = round_to_int(xs.astype(jnp.float32) * (1.0 / 128.0), interpret)
    return xs, hi, xs - 128 * hi


def split_step(amax, steps: int, interpret: bool):
    """absmax [..] -> (step, 1 / step correctly rounded) of the ``steps``-step fixed point ``split_values`` writes
    (``step = max(absmax, 1e-30) / steps``)."""
    step = jnp.maximum(amax, 1e-30) / steps
    return step, reciprocal(step, interpret)


def store_split_digits(d_ref, x, step, inv, mask, col0: int, steps: int, interpret: bool) -> None:
    """x [rows, C] float32 (columns from ``col0``), its rows' step / inv [rows, 1] -> the hi and lo digits of
    ``split_values`` into ``d_ref [2, rows, K]`` int8 (``mask`` [rows, C])."""
    _, hi, lo = split_values(x, step, inv, steps, interpret)
    for j, d in enumerate((hi, lo)):
        pltriton.store(d_ref.at[pl.ds(j, 1), :, pl.ds(col0, x.shape[1])], d.astype(jnp.int8)[None], mask=mask[None])


def _load_rows(x_ref, *, k, chunk, rows, m):
    """The program's ``rows`` rows of x as [rows, chunk] float32 chunks (rows past M, columns past K masked to 0)
    -> ([(first column, mask, chunk)], row absmax [rows, 1])."""
    row_ok = pl.program_id(0) * rows + jnp.arange(rows) < m
    parts, amax = [], jnp.zeros((rows, 1), jnp.float32)
    for c0 in range(0, k, chunk):
        mask = row_ok[:, None] & (c0 + jnp.arange(chunk) < k)[None, :]
        xc = pltriton.load(x_ref.at[:, pl.ds(c0, chunk)], mask=mask, other=0.0).astype(jnp.float32)
        parts.append((c0, mask, xc))
        amax = jnp.maximum(amax, jnp.max(jnp.abs(xc), axis=1, keepdims=True))
    return parts, amax, row_ok


def _kernel(x_ref, q_ref, s_ref, *, k, chunk, rows, m, interpret):
    # x_ref [block_m, K] float; q_ref [block_m, K] int8; s_ref [block_m, 1] float32.
    parts, amax, row_ok = _load_rows(x_ref, k=k, chunk=chunk, rows=rows, m=m)
    sx = jnp.where(amax > 0, amax / 127.0, 1.0)
    inv = reciprocal(sx, interpret)
    for c0, mask, xc in parts:
        q = jnp.clip(round_quotient(xc, sx, inv, interpret), -127, 127)
        pltriton.store(q_ref.at[:, pl.ds(c0, chunk)], q.astype(jnp.int8), mask=mask)
    pltriton.store(s_ref, sx, mask=row_ok[:, None])


def _split_kernel(x_ref, s_ref, d_ref, *, k, chunk, rows, m, steps, interpret):
    # x_ref [block_m, K] float; s_ref [block_m, 1] float32; d_ref [2, block_m, K] int8 (hi digits, then lo).
    parts, amax, row_ok = _load_rows(x_ref, k=k, chunk=chunk, rows=rows, m=m)
    step, inv = split_step(amax, steps, interpret)
    for c0, mask, xc in parts:
        store_split_digits(d_ref, xc, step, inv, mask, c0, steps, interpret)
    pltriton.store(s_ref, step, mask=row_ok[:, None])


def _check(x, block_m, block_k, num_warps, name):
    if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise QuantFormatError(f"{name} takes a float [M, K] array; got {x.dtype} {x.shape}")
    pow2 = lambda v: v >= 1 and not v & (v - 1)  # noqa: E731
    if not (pow2(block_m) and pow2(block_k) and block_k >= 16) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise QuantFormatError(f"block_m must be a power of two >= 1, block_k a power of two >= 16 and num_warps "
                               f"one of 1-32 (powers of two); got block_m={block_m}, block_k={block_k}, "
                               f"num_warps={num_warps}")
    k = x.shape[1]
    chunk = min(block_k, 1 << max(4, (k - 1).bit_length()))  # no wider than K padded to a power of two
    return chunk, pl.cdiv(k, chunk) * chunk  # and the block's width: whole chunks, the columns past K masked


@functools.partial(jax.jit, static_argnames=("block_m", "block_k", "num_warps", "interpret"))
def quantize_rows(x, *, block_m: int = 1, block_k: int = 16384, num_warps: int = 16, interpret: bool = False):
    """x [M, K] float -> (xq [M, K] int8, sx [M, 1] float32); see the module docstring. The defaults (one chunk of
    the padded row, 16 warps) were the fastest at W8A8's M=512 shapes on the H100 (down 10.5 us against 13.6 before
    session 22 and XLA's 17.3; ``experiments/results/qmatmul_diag/s22_act_prep/``)."""
    chunk, kp = _check(x, block_m, block_k, num_warps, "quantize_rows")
    m, k = x.shape
    kernel = functools.partial(_kernel, k=k, chunk=chunk, rows=block_m, m=m, interpret=interpret)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(m, block_m),), in_specs=[pl.BlockSpec((block_m, kp), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((block_m, kp), lambda i: (i, 0)), pl.BlockSpec((block_m, 1), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct((m, k), jnp.int8), jax.ShapeDtypeStruct((m, 1), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="w8a8_quantize_rows",
    )(x)


@functools.partial(jax.jit, static_argnames=("steps", "block_m", "block_k", "num_warps", "interpret"))
def split_rows(x, *, steps: int, block_m: int = 1, block_k: int = 16384, num_warps: int = 16,
               interpret: bool = False):
    """x [M, K] float -> (step [M, 1] float32, digits [2M, K] int8): ``quantized_matmul.split_digits(x, axis=1)``
    in one launch, the activation prep of the ``xla_split`` int8 path (XLA wrote it as a row reduction and an
    elementwise fusion before every int8 dot). Per row ``step = max(absmax, 1e-30) / steps``, ``xs = round(x /
    step)`` (``round_quotient``: the correctly rounded quotient; XLA's may be one step off on a few elements),
    ``hi = round(xs / 128)`` in rows [0, M), ``lo = xs - 128 hi`` in rows [M, 2M)."""
    chunk, kp = _check(x, block_m, block_k, num_warps, "split_rows")
    m, k = x.shape
    kernel = functools.partial(_split_kernel, k=k, chunk=chunk, rows=block_m, m=m, steps=int(steps),
                               interpret=interpret)
    step, d = pl.pallas_call(
        kernel, grid=(pl.cdiv(m, block_m),), in_specs=[pl.BlockSpec((block_m, kp), lambda i: (i, 0))],
        out_specs=[pl.BlockSpec((block_m, 1), lambda i: (i, 0)), pl.BlockSpec((2, block_m, kp), lambda i: (0, i, 0))],
        out_shape=[jax.ShapeDtypeStruct((m, 1), jnp.float32), jax.ShapeDtypeStruct((2, m, k), jnp.int8)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="xla_split_digits",
    )(x)
    return step, d.reshape(2 * m, k)
