"""GPU Pallas kernel (Triton lowering): a residual add and the RMSNorm that follows it, in one pass.

Public: ``add_rms_norm`` (jitted wrapper) and ``add_rms_norm_reference`` (plain jnp, the truth).

``add_rms_norm(x [R, D], residual [R, D], scale [D], *, eps) -> (y [R, D], s [R, D])`` with ``s = x + residual``
rounded to the inputs' dtype (the new residual stream) and ``y = scale * (s / sqrt(mean(s**2) + eps))``: the
normalisation in float32, rounded to the dtype, then multiplied by ``scale`` (GLM's RMSNorm, as Hugging Face
computes it). In a decode step XLA writes this as three kernels (the add, the row reduction, the scaling
multiply), each mostly launch latency for a few KB of data; 40 GLM-4-9B layers have two such sites each. Here
each program loads ``block_r`` whole rows once (D padded to a power of two and masked) and writes both outputs.

``x`` may also be float32 split-K partial sums [S, R, D] of the matmul that produced it (``splitk_matmul``): the
kernel adds the S slices, rounds the sum to the residual's dtype (as a matmul writing that dtype would) and goes
on as above, so the partial sums need no kernel of their own.

With ``digits`` (an ``act_digits`` layout: 0 for the ``xla_split`` int8 path, an int4 group G for the one-row
integer-dot GEMV) the kernel also writes y's fixed-point digits, which the quantized matmul that y feeds would
otherwise compute in a launch of its own (``quantized_matmul.digits_layout``), and returns ``(y, s, ActDigits)``.
The planes layout (G) takes one row: its program loads each group's two halves apart, as the planes store them.
Forward only (no VJP): a decode step's path.

Block sizes (keyword-only, static): ``block_r`` rows a program, ``num_warps`` (default 4 without digits,
``DIGIT_WARPS`` with them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .act_digits import SPLIT_STEPS, check_layout, digit_out_shapes, pack, planes_geometry, store_planes
from .quantize_rows import split_step, store_split_digits


DIGIT_WARPS = {"planes": 8, "rows": 16}  # H100, one row of D = 4096 (session 25, results/qmatmul_diag/s25_digits/):
# planes (a step per group) 2.29 us with 8 warps (4: 2.70, 16: 2.35) against 2.76 for the norm and the digit launch
# apart; rows 2.03-2.05 with 16 (4: 2.37) against 3.01


def add_rms_norm_reference(x, residual, scale, *, eps: float):
    """Plain jnp: (y, s) as in the module docstring."""
    if x.ndim == residual.ndim + 1:  # split-K partial sums
        x = jnp.sum(x, axis=0).astype(residual.dtype)
    s = (x + residual).astype(x.dtype)
    s32 = s.astype(jnp.float32)
    normed = (s32 * lax.rsqrt(jnp.mean(s32 * s32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed, s


def _kernel(x_ref, r_ref, w_ref, y_ref, s_ref, *digit_refs, d, dp, rows, total_rows, eps, splits, interpret=False):
    # x_ref, r_ref, y_ref, s_ref [block_r, D] (x_ref [S, block_r, D] with splits = S); w_ref [D]; digit_refs
    # (layout 0): step [block_r, 1] float32, digits [2, block_r, D] int8. Rows past R and columns past D are masked.
    row_ok = pl.program_id(0) * rows + jnp.arange(rows) < total_rows
    col_ok = jnp.arange(dp) < d
    mask = row_ok[:, None] & col_ok[None, :]
    dtype = s_ref.dtype
    if splits:
        x = sum(pltriton.load(x_ref.at[pl.ds(i, 1), :, pl.ds(0, dp)], mask=mask[None], other=0.0)[0]
                for i in range(splits))
        x = x.astype(dtype).astype(jnp.float32)
    else:
        x = pltriton.load(x_ref.at[:, pl.ds(0, dp)], mask=mask, other=0.0).astype(jnp.float32)
    r = pltriton.load(r_ref.at[:, pl.ds(0, dp)], mask=mask, other=0.0).astype(jnp.float32)
    s = (x + r).astype(dtype)
    pltriton.store(s_ref.at[:, pl.ds(0, dp)], s, mask=mask)
    s32 = s.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(s32 * s32, axis=1, keepdims=True) * (1.0 / d) + eps)  # [block_r, 1]
    w = pltriton.load(w_ref.at[pl.ds(0, dp)], mask=col_ok, other=0.0).astype(jnp.float32)
    y = (s32 * inv).astype(dtype).astype(jnp.float32) * w[None, :]  # one rounding: bf16 x bf16 is exact in f32
    pltriton.store(y_ref.at[:, pl.ds(0, dp)], y.astype(dtype), mask=mask)
    if digit_refs:  # y's digits, from the values just stored
        st_ref, d_ref = digit_refs
        yq = y.astype(dtype).astype(jnp.float32)
        step, inv = split_step(jnp.max(jnp.abs(yq), axis=1, keepdims=True), SPLIT_STEPS, interpret)
        store_split_digits(d_ref, yq, step, inv, mask, 0, SPLIT_STEPS, interpret)
        pltriton.store(st_ref, step, mask=row_ok[:, None])


def _planes_kernel(x_ref, r_ref, w_ref, y_ref, s_ref, planes_ref, xg_ref, step_ref, *, d, kg, rows, eps, interpret):
    # One row as [K/G, 2, G/2] (each group's low and high half): x_ref, r_ref, w_ref, y_ref, s_ref; the groups are
    # padded to ``rows`` (a power of two) and masked. planes_ref [4, K/G, G/2] int8, xg_ref, step_ref [K/G].
    g2 = x_ref.shape[2]
    gm = jnp.arange(rows) < kg
    dtype = s_ref.dtype

    def load(ref, h):
        return pltriton.load(ref.at[pl.ds(0, rows), pl.ds(h, 1), :], mask=gm[:, None, None], other=0.0).reshape(
            rows, g2).astype(jnp.float32)

    def store(ref, h, v):
        pltriton.store(ref.at[pl.ds(0, rows), pl.ds(h, 1), :], v.astype(dtype).reshape(rows, 1, g2),
                       mask=gm[:, None, None])

    s32 = []
    for h in range(2):
        s = (load(x_ref, h) + load(r_ref, h)).astype(dtype)
        store(s_ref, h, s)
        s32.append(s.astype(jnp.float32))
    inv = lax.rsqrt((jnp.sum(s32[0] * s32[0]) + jnp.sum(s32[1] * s32[1])) * (1.0 / d) + eps)
    halves = []
    for h in range(2):
        y = ((s32[h] * inv).astype(dtype).astype(jnp.float32) * load(w_ref, h)).astype(dtype)
        store(y_ref, h, y)
        halves.append(y.astype(jnp.float32))
    store_planes(planes_ref, xg_ref, step_ref, halves, gm, 0, interpret)


def check_inputs(x, residual, scale) -> None:
    """Raise ValueError naming what is wrong, before any launch."""
    partials = x.ndim == 3 and x.dtype == jnp.float32 and x.shape[1:] == residual.shape
    if residual.ndim != 2 or not (partials or (residual.shape == x.shape and residual.dtype == x.dtype)):
        raise ValueError(f"x and residual must be [R, D] arrays of one shape and dtype, or x float32 partial sums "
                         f"[S, R, D]; got {x.dtype} {x.shape} and {residual.dtype} {residual.shape}")
    if not jnp.issubdtype(residual.dtype, jnp.floating):
        raise ValueError(f"residual must be a float array; got {residual.dtype}")
    d = residual.shape[1]
    if scale.shape != (d,) or scale.dtype != residual.dtype:
        raise ValueError(f"scale must be [D] = ({d},) in the residual's dtype {residual.dtype}; got {scale.dtype} "
                         f"{scale.shape}")


def _launch_rows(x, residual, scale, eps, block_r, num_warps, interpret, digits: bool):
    """The row kernel's launch -> (y, s), or with ``digits`` (y, s, y's rows-layout ``ActDigits``)."""
    r, d = residual.shape
    splits = x.shape[0] if x.ndim == 3 else 0
    dp = 1 << max(0, (d - 1).bit_length())
    kernel = functools.partial(_kernel, d=d, dp=dp, rows=block_r, total_rows=r, eps=float(eps), splits=splits,
                               interpret=interpret)
    row_spec = pl.BlockSpec((block_r, d), lambda i: (i, 0))
    x_spec = pl.BlockSpec((splits, block_r, d), lambda i: (0, i, 0)) if splits else row_spec
    out = jax.ShapeDtypeStruct((r, d), residual.dtype)
    digit_specs = [pl.BlockSpec((block_r, 1), lambda i: (i, 0)), pl.BlockSpec((2, block_r, d), lambda i: (0, i, 0))]
    outs = pl.pallas_call(
        kernel, grid=(pl.cdiv(r, block_r),), in_specs=[x_spec, row_spec, pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row_spec, row_spec, *(digit_specs if digits else [])],
        out_shape=[out, out, *(digit_out_shapes(r, d, 0) if digits else [])],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="add_rms_norm_digits" if digits else "add_rms_norm",
    )(x, residual, scale)
    return (*outs[:2], pack(outs[2:], r, d, 0)) if digits else outs


def _launch(x, residual, scale, eps, block_r, num_warps, interpret):
    return _launch_rows(x, residual, scale, eps, block_r, num_warps, interpret, digits=False)


def _launch_planes(x, residual, scale, eps, group, num_warps, interpret):
    d = residual.shape[1]
    kg, rows, g2 = planes_geometry(d, group)
    view = pl.BlockSpec((kg, 2, g2), lambda i: (0, 0, 0))
    out = jax.ShapeDtypeStruct((kg, 2, g2), residual.dtype)
    outs = pl.pallas_call(
        functools.partial(_planes_kernel, d=d, kg=kg, rows=rows, eps=float(eps), interpret=interpret),
        grid=(1,), in_specs=[view] * 3,
        out_specs=[view, view, pl.BlockSpec((4, kg, g2), lambda i: (0, 0, 0)), pl.BlockSpec((kg,), lambda i: (0,)),
                   pl.BlockSpec((kg,), lambda i: (0,))],
        out_shape=[out, out, *digit_out_shapes(1, d, group)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="add_rms_norm_digits",
    )(*(a.reshape(kg, 2, g2) for a in (x, residual, scale)))
    return outs[0].reshape(1, d), outs[1].reshape(1, d), pack(outs[2:], 1, d, group)


# Reverse mode (bfloat16 training on a GPU runs the model's norms through this kernel): the forward pass launches
# the kernel, the backward pass is the VJP of the plain-jnp reference (XLA), so gradients never transpose a kernel.
_differentiable = jax.custom_vjp(_launch, nondiff_argnums=(3, 4, 5, 6))


def _fwd(x, residual, scale, eps, block_r, num_warps, interpret):
    return _launch(x, residual, scale, eps, block_r, num_warps, interpret), (x, residual, scale)


def _bwd(eps, block_r, num_warps, interpret, saved, cotangents):
    _, vjp = jax.vjp(lambda a, b, c: add_rms_norm_reference(a, b, c, eps=eps), *saved)
    return vjp(tuple(cotangents))


_differentiable.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("eps", "block_r", "num_warps", "digits", "interpret"))
def add_rms_norm(x, residual, scale, *, eps: float, block_r: int = 1, num_warps: int | None = None,
                 digits: int | None = None, interpret: bool = False):
    """x, residual [R, D], scale [D] (all one float dtype; or x float32 partial sums [S, R, D]) -> (y, s) [R, D];
    with ``digits`` (0, or an int4 group G for one row; not with partial sums) -> (y, s, y's ``ActDigits``); see
    the module docstring. Differentiable without ``digits``: reverse mode takes the reference's VJP."""
    check_inputs(x, residual, scale)
    check_layout(digits)
    if num_warps is None:
        num_warps = 4 if digits is None else DIGIT_WARPS["planes" if digits else "rows"]
    if block_r < 1 or block_r & (block_r - 1) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"block_r must be a power of two >= 1 and num_warps one of 1-32 (powers of two); got "
                         f"block_r={block_r}, num_warps={num_warps}")
    if digits is None:
        return tuple(_differentiable(x, residual, scale, float(eps), block_r, num_warps, interpret))
    if x.ndim == 3 or (digits and residual.shape[0] != 1):
        raise ValueError(f"digits={digits} takes x [R, D] (not split-K partial sums), and one row for an int4 group "
                         f"layout; got x {x.shape}")
    if digits:
        return _launch_planes(x, residual, scale, eps, digits, num_warps, interpret)
    return _launch_rows(x, residual, scale, eps, block_r, num_warps, interpret, digits=True)
