"""TPU Pallas kernel (Mosaic TPU lowering) for ``y[M, O] = x[M, I] @ dequant(w)[I, O]`` on quantized weights.

Written for Mosaic TPU's rules: grid ``(M / block_m, N / block_n, K / block_k)`` with the K axis last and
"arbitrary" (a float32 VMEM accumulator carries across it), block shapes multiples of (8, 128) or the full
array dim, int4 nibbles unpacked on int32 vregs. Scales and zero points of int4 are passed whole along K
(``[I / group, block_n]`` per N block, small) and indexed by the K step, so their blocks need no 8-row
multiple. Edge blocks (ragged N, K) rely on Mosaic's padding; K must be a multiple of ``block_k``.

NOT RUN ON A TPU: no TPU is available to this project. It is exercised only with ``interpret=True`` on CPU.
Note that TPU v7x has no int8 MXU path, so W8A8 there would need fp8 instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .qmatmul_tiles import TileConfig
from .quant_formats import Int4Weight, Int8Weight, QuantFormatError, W8A8Weight


def _kernel(*refs, fmt: str, group: int, gps: int, has_zero: bool, compute_dtype, aliased: bool = False):
    if aliased:  # refs = inputs, poisoned buffer (aliased to the output), output, scratch: drop the input view
        refs = refs[:-3] + refs[-2:]
    if fmt == "w8a8":
        x_ref, sx_ref, w_ref, s_ref, o_ref, acc_ref = refs
    elif has_zero:
        x_ref, w_ref, s_ref, z_ref, o_ref, acc_ref = refs
    else:
        x_ref, w_ref, s_ref, o_ref, acc_ref = refs
    kid = pl.program_id(2)

    @pl.when(kid == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    if fmt == "w8a8":
        acc_ref[...] += jax.lax.dot_general(x_ref[...], w_ref[...], (((1,), (1,)), ((), ())),  # w: [BN, BK]
                                            preferred_element_type=jnp.int32).astype(jnp.float32)
    elif fmt == "int8":
        w = w_ref[...].astype(jnp.float32).astype(compute_dtype)
        acc_ref[...] += jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32)
    else:
        g2 = group // 2
        for j in range(gps):
            p = w_ref[pl.ds(j * g2, g2), :].astype(jnp.int32)  # [G/2, BN]
            row = pl.ds(kid * gps + j, 1)
            z = z_ref[row, :].astype(jnp.float32) if has_zero else 8.0
            s = s_ref[row, :].astype(jnp.float32)  # [1, BN]
            lo = ((p & 0xF).astype(jnp.float32) - z).astype(compute_dtype)
            hi = ((p >> 4).astype(jnp.float32) - z).astype(compute_dtype)
            xl = x_ref[:, pl.ds(j * group, g2)]
            xh = x_ref[:, pl.ds(j * group + g2, g2)]
            part = (jnp.dot(xl, lo, preferred_element_type=jnp.float32)
                    + jnp.dot(xh, hi, preferred_element_type=jnp.float32))
            acc_ref[...] += part * s

    @pl.when(kid == pl.num_programs(2) - 1)
    def _():
        out = acc_ref[...]
        if fmt == "w8a8":
            out = out * sx_ref[...]
        if fmt != "int4":
            out = out * s_ref[...].astype(jnp.float32)
        o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "out_dtype", "interpret"))
def tpu_qmatmul(x, sx, w, out=None, *, cfg: TileConfig, out_dtype, interpret: bool = False):
    """x: [Mp, K] (int8 + sx [Mp, 1] for W8A8), Mp a multiple of ``cfg.block_m`` -> [Mp, N] ``out_dtype``.
    An ``Int8Weight`` must be stored [K, N] (not K-major)."""
    if isinstance(w, Int8Weight) and w.k_major:
        raise QuantFormatError("the Pallas TPU kernel takes an Int8Weight stored [K, N] only; got a K-major "
                               "[N, K] one (quantized_matmul serves it on XLA's int8 dot)")
    mp, k = x.shape
    n = w.out_features
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    fmt = "w8a8" if isinstance(w, W8A8Weight) else "int8" if isinstance(w, Int8Weight) else "int4"
    group = w.group if isinstance(w, Int4Weight) else 0
    grid = (mp // bm, pl.cdiv(n, bn), k // bk)
    x_spec = pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))
    if fmt == "int4":
        g_spec = pl.BlockSpec((k // group, bn), lambda i, j, kk: (0, j))
        operands = [x, w.packed, w.scale] + ([w.zero] if w.zero is not None else [])
        specs = [x_spec, pl.BlockSpec((bk // 2, bn), lambda i, j, kk: (kk, j)), g_spec]
        specs += [g_spec] if w.zero is not None else []
    else:
        operands = [x] + ([sx] if fmt == "w8a8" else []) + [w.qweight, w.scale.reshape(1, n)]
        specs = ([x_spec] + ([pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0))] if fmt == "w8a8" else [])
                 + [pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)) if fmt == "w8a8"
                    else pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
                    pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))])
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))
    aliases = {}
    if out is not None:  # tests: a poisoned buffer that the kernel must overwrite everywhere
        if out.shape != (mp, n) or out.dtype != jnp.dtype(out_dtype):
            raise ValueError(f"out must be {jnp.dtype(out_dtype)} {(mp, n)}; got {out.dtype} {out.shape}")
        aliases = {len(operands): 0}
        operands, specs = operands + [out], specs + [out_spec]
    kernel = functools.partial(_kernel, fmt=fmt, group=group, gps=max(bk // group, 1) if group else 0,
                               has_zero=fmt == "int4" and w.zero is not None,
                               compute_dtype=x.dtype if fmt != "w8a8" else jnp.int8, aliased=out is not None)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype), grid=grid, in_specs=specs,
        out_specs=out_spec, input_output_aliases=aliases,
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name=f"qmatmul_{fmt}_tpu",
    )(*operands)
