"""GPU Pallas kernels (Triton lowering) for ``y[M, O] = x[M, I] @ dequant(w)[I, O]`` on quantized weights.

Shape letters: M rows of x, K = I (reduction), N = O. Two kernels share one body per format:

* ``gemv`` (one row of x, decode): each program owns ``block_n`` columns and a 1/``split_k`` slice of K; it
  keeps a ``[block_k, block_n]`` float32 FMA accumulator (no tensor cores, no per-step reductions) and
  reduces it once at the end. Partial sums of the K slices are added by XLA.
* ``dot`` (tensor cores): ``[block_m, block_n]`` tiles, K loop of ``block_k`` steps, int -> bf16/f16
  dequantization in registers before ``jnp.dot``; W8A8 uses an int8 x int8 -> int32 dot.

int8 weight-only reads either layout: ``[K, N]`` tiles ``[block_k, block_n]``, or K-major ``[N, K]``
(``Int8Weight.k_major``) tiles ``[block_n, block_k]``, contiguous along K (the gemv's accumulator is then
``[block_n, block_k]``, reduced over K at the end; the dot contracts the last dims of both tiles, as W8A8 does).
int4 likewise on the dot: a K-major ``Int4Weight`` (``packed[N, K/2]``) gives ``[block_n, G/2]`` nibble planes
contracted on their last dim; its one-row GEMV is ``qmatmul_dp4a.py`` (integer dot products), not this file's.
With ``unroll = u`` (a K loop whose trip count is static) the loop is written out and u tiles are loaded ahead,
so a short K loop (decode: K = 4096 in 8 steps of 512) has all its loads in flight from the start.

Grid ``(M / block_m, N / block_n, split_k)``: M varies fastest, so programs sharing a weight tile run
together and the tile is read from DRAM once. Columns past N are masked on load and store (ragged N);
x is padded to a multiple of ``block_m`` by the caller. Scales (and zero points) are applied per output
channel (int8) or per group (int4) to the float32 accumulator.

int4 with ``asm_dequant``: the packed bytes become bfloat16 pairs in PTX (``_int4_planes``: per four bytes two
``prmt``, four ``lop3`` with the bf16 magic number 128, two shifts and four ``fma.bf16x2``: about 1.5
instructions a weight, against about 4 for the float32 bit tricks), the tensor-core operand as it is. An
asymmetric weight's zero point is then taken out once per group and column (``s * (x.u - z * sum(x))``, the
sums of x per group computed once by XLA and passed in) instead of per weight. With ``scale_in_bf16`` the planes
are scaled in PTX too (``(u - z) * s`` rounded once to bfloat16, as XLA's dequantize-then-dot rounds the weight),
so the dots accumulate straight into the accumulator with no per-group rescale between them. Interpret mode (no
PTX on the CPU) computes the same values with ``jnp``. An int4 ``block_k`` below the group walks each group in
``group / block_k`` steps (fewer live registers; measured no faster on the H100, kept where the tuner picks it).

This file knows nothing of dispatch; ``quantized_matmul.py`` validates inputs and picks the config.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .qmatmul_tiles import TileConfig
from .quant_formats import Int4Weight, Int8Weight, W8A8Weight

_MAGIC = 0x4B000000  # float32 bits of 2**23: or-ing a small non-negative int n into the mantissa gives 2**23 + n
_TWO23 = 8388608.0


def _int8_to_f32(q, fast: bool):
    """int8 [..] -> float32 exactly; fast: sign-extend, add 2**23 + 128 as bits, subtract."""
    if not fast:
        return q.astype(jnp.float32)
    bits = q.astype(jnp.int32) + (_MAGIC + 128)
    return lax.bitcast_convert_type(bits, jnp.float32) - (_TWO23 + 128.0)


def _nibble_minus(u, z, fast: bool):
    """u int32 in [0, 15], z float32 zero point -> (u - z) float32 exactly."""
    if not fast:
        return u.astype(jnp.float32) - z
    return lax.bitcast_convert_type(u | _MAGIC, jnp.float32) - (_TWO23 + z)


_ASM_NIBBLES = """{
.reg .b32 t0, t1, zero, one, neg;
mov.b32 zero, 0;
mov.b32 one, 0x3F803F80;
mov.b32 neg, NEG;
prmt.b32 t0, $2, zero, 0x4140;
prmt.b32 t1, $2, zero, 0x4342;
SHIFT
lop3.b32 t0, t0, 0x000F000F, 0x43004300, 0xEA;
lop3.b32 t1, t1, 0x000F000F, 0x43004300, 0xEA;
fma.rn.bf16x2 $0, t0, one, neg;
fma.rn.bf16x2 $1, t1, one, neg;
}"""
# Four packed bytes ($2; byte i is element i) -> their low (or, with SHIFT, high) nibbles as two bf16x2
# registers ($0, $1). prmt spreads bytes (0, 1) and (2, 3) into 16-bit lanes; lop3 computes (t & 0xF) | 0x4300,
# the bfloat16 128 + u (exact: the spacing of bf16 at 128 is 1); the fma adds NEG = -(128 + offset). One asm
# per plane: the Pallas Triton lowering takes single-result inline asm only (jax 0.11); ptxas shares the prmt.
_NEG_BITS = {8: "0xC308C308", 0: "0xC300C300"}  # bf16 -136 and -128, twice
_SHIFT = {"lo": "", "hi": "shr.b32 t0, t0, 4;\nshr.b32 t1, t1, 4;"}


def _int4_planes(p, offset: int, interpret: bool):
    """packed uint8 tile [R, BN] -> (lo, hi) bfloat16 tiles [R, BN] of ``u - offset`` (exact; offset 8 or 0)."""
    if interpret:
        lo = ((p & 0xF).astype(jnp.float32) - offset).astype(jnp.bfloat16)
        hi = ((p >> 4).astype(jnp.float32) - offset).astype(jnp.bfloat16)
        return lo, hi
    out = jax.ShapeDtypeStruct(p.shape, jnp.bfloat16)
    asm = _ASM_NIBBLES.replace("NEG", _NEG_BITS[offset])
    return tuple(pltriton.elementwise_inline_asm(asm.replace("SHIFT", _SHIFT[plane]), args=[p],
                                                 constraints="=r,=r,r", pack=4, result_shape_dtypes=[out])[0]
                 for plane in ("lo", "hi"))


_ASM_SCALE = {  # bf16x2 lanes: $0 = ($1 [+ $2]) * s, rounded once to bfloat16 (fma with -0.0 as the addend)
    False: "{ .reg .b32 nz; mov.b32 nz, 0x80008000; fma.rn.bf16x2 $0, $1, $2, nz; }",
    True: "{ .reg .b32 nz, one, t; mov.b32 nz, 0x80008000; mov.b32 one, 0x3F803F80;\n"
          "fma.rn.bf16x2 t, $1, one, $2; fma.rn.bf16x2 $0, t, $3, nz; }",
}


def _scale_planes(planes, s, z, interpret: bool):
    """bf16 nibble planes [R, BN] (``u - 8``, or ``u`` with a zero point z [1, BN]) -> ``(u - z) * s`` as
    bfloat16 (the subtraction exact, the product rounded once, as XLA's dequantize-then-dot rounds it)."""
    shape = planes[0].shape
    sb = jnp.broadcast_to(s.astype(jnp.bfloat16), shape)
    nz = None if z is None else jnp.broadcast_to((-z).astype(jnp.bfloat16), shape)
    if interpret:
        return tuple(((q.astype(jnp.float32) + (0 if nz is None else nz.astype(jnp.float32)))
                      * sb.astype(jnp.float32)).astype(jnp.bfloat16) for q in planes)
    out = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    return tuple(pltriton.elementwise_inline_asm(
        _ASM_SCALE[nz is not None], args=[q, sb] if nz is None else [q, nz, sb],
        constraints="=r,r,r" if nz is None else "=r,r,r,r", pack=2, result_shape_dtypes=[out])[0] for q in planes)


def _int4_units(group: int, block_k: int) -> tuple[int, int]:
    """-> (units per group, units per step): an int4 K step covers block_k / group whole groups, or, with
    block_k below the group, one of group / block_k parts of a group."""
    return max(1, group // block_k), max(1, block_k // group)


def _takes_x_sums(cfg: TileConfig, has_zero: bool) -> bool:
    """An asymmetric int4 weight on the asm dot (weights not pre-scaled) takes x's per-unit sums as one more
    operand, [Mp, units]: the zero point comes out once per unit and column."""
    return has_zero and cfg.asm_dequant and cfg.kernel == "dot" and not cfg.scale_in_bf16


def _k_loop(steps, step, load, zero, prefetch: bool, unroll: int = 0):
    """``acc = step(i, acc, load(i))`` over ``steps`` K tiles. With ``prefetch`` the load of tile i + 1 is
    issued before the math of tile i. ``unroll = u > 0`` (``steps`` a Python int): the loop written out in
    Python, tile i + u loaded before the math of tile i, so u tiles are in flight from the start."""
    if unroll:
        acc, tiles = zero, [load(i) for i in range(min(unroll, steps))]
        for i in range(steps):
            if i + unroll < steps:
                tiles.append(load(i + unroll))
            acc = step(i, acc, tiles.pop(0))
        return acc
    if prefetch:
        acc, _ = lax.fori_loop(0, steps, lambda i, c: (step(i, c[0], c[1]), load(i + 1)), (zero, load(0)))
    else:
        acc = lax.fori_loop(0, steps, lambda i, acc: step(i, acc, load(i)), zero)
    return acc


def _gemv_loop(steps, step, load, zero, prefetch: bool, unroll: int = 0, axis: int = 0):
    """The GEMV reduction: ``_k_loop`` on a float32 accumulator tile, summed over its K ``axis`` -> [1, BN]."""
    return jnp.sum(_k_loop(steps, step, load, zero, prefetch, unroll), axis=axis)[None, :]


def _kernel(*refs, fmt: str, cfg: TileConfig, n_total: int, k_total: int, group: int, has_zero: bool,
            k_major: bool = False, aliased: bool = False, interpret: bool = False):
    if aliased:  # the poisoned output buffer passed in (refs[-2]) is the output itself; drop the input view
        refs = refs[:-2] + refs[-1:]
    if fmt == "w8a8":
        x_ref, sx_ref, w_ref, s_ref, o_ref = refs
        z_ref = None
    elif _takes_x_sums(cfg, has_zero):
        x_ref, w_ref, s_ref, z_ref, xs_ref, o_ref = refs
    elif has_zero:
        x_ref, w_ref, s_ref, z_ref, o_ref = refs
    else:
        x_ref, w_ref, s_ref, o_ref = refs
        z_ref = None
    bn, fast = cfg.block_n, cfg.fast_dequant
    cols = pl.program_id(1) * bn + jnp.arange(bn, dtype=jnp.int32)
    cmask = cols < n_total  # [BN]: ragged N
    total_steps = k_total // cfg.block_k
    per_split = pl.cdiv(total_steps, cfg.split_k)
    first = pl.program_id(2) * per_split
    # Every split has per_split steps when they divide evenly (a Python int: the loop may be unrolled).
    steps = per_split if total_steps % cfg.split_k == 0 else jnp.clip(total_steps - first, 0, per_split)

    def load_cols(ref, rows, dtype=None):  # [rows, BN] tile of a [*, N] ref, zeros past N
        v = pltriton.load(ref.at[rows, :], mask=cmask[None, :], other=0)
        return v if dtype is None else v.astype(dtype)

    def load_row(ref, r):  # [1, BN] row r of a [*, N] ref, as float32
        return load_cols(ref, pl.ds(r, 1), jnp.float32)

    if fmt == "w8a8":  # weight stored [N, K] (K-major): contract the last dims of both tiles
        bk = cfg.block_k

        def body(i, acc):
            k0 = pl.multiple_of((first + i) * bk, bk)
            xt = x_ref[:, pl.ds(k0, bk)]  # [BM, BK] int8
            wt = pltriton.load(w_ref.at[:, pl.ds(k0, bk)], mask=cmask[:, None], other=0)  # [BN, BK] int8
            return acc + lax.dot_general(xt, wt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        acci = lax.fori_loop(0, steps, body, jnp.zeros((cfg.block_m, bn), jnp.int32))
        acc = acci.astype(jnp.float32) * sx_ref[...] * load_row(s_ref, 0)
    elif fmt == "int8":  # tiles [BK, BN] of a [K, N] weight, or [BN, BK] of a K-major [N, K] one
        bk, kdim = cfg.block_k, 1 if k_major else 0  # kdim: the tile's K axis

        def load_w(i):  # clamped: a prefetch past the last step re-reads it
            k0 = pl.multiple_of(jnp.minimum((first + i) * bk, k_total - bk), bk)
            if k_major:
                return pltriton.load(w_ref.at[:, pl.ds(k0, bk)], mask=cmask[:, None], other=0)
            return load_cols(w_ref, pl.ds(k0, bk))

        def x_cols(i):  # the step's K columns of x
            return pl.ds(pl.multiple_of((first + i) * bk, bk), bk)

        if cfg.kernel == "gemv":  # a float32 FMA accumulator shaped as the tile, reduced over K at the end
            def step(i, acc, wt):
                xt = x_ref[:, x_cols(i)] if k_major else x_ref[0, x_cols(i)][:, None]  # [1, BK] / [BK, 1]
                return acc + xt.astype(jnp.float32) * _int8_to_f32(wt, fast)

            tile = (bn, bk) if k_major else (bk, bn)
            acc = _gemv_loop(steps, step, load_w, jnp.zeros(tile, jnp.float32), cfg.prefetch, cfg.unroll, axis=kdim)
        else:
            def step(i, acc, wt):
                xt = x_ref[:, x_cols(i)]  # [BM, BK]
                wt = _int8_to_f32(wt, fast).astype(xt.dtype)
                return acc + lax.dot_general(xt, wt, (((1,), (kdim,)), ((), ())), preferred_element_type=jnp.float32)
            acc = _k_loop(steps, step, load_w, jnp.zeros((cfg.block_m, bn), jnp.float32), False, cfg.unroll)
        acc = acc * load_row(s_ref, 0)
    else:  # int4, half-group packing: packed rows g*G/2 + j hold x columns g*G + j (lo) and g*G + G/2 + j (hi)
        # The loop walks "units": whole groups (block_k >= G: block_k / G of them a step) or, with block_k < G,
        # parts of a group (G / block_k per group, one a step: fewer live registers). Unit u of hb packed rows is
        # part h of group g; its x columns are g*G + h*hb + [0, hb) (lo) and g*G + G/2 + h*hb + [0, hb) (hi).
        g2 = group // 2
        sub, ups = _int4_units(group, cfg.block_k)
        hb = g2 // sub  # packed rows per unit
        n_units = (k_total // group) * sub

        def unit_col(u):  # -> the first lo column of x of unit u
            return pl.multiple_of((u // sub) * group + (u % sub) * hb, hb)

        def load_group(ref, g):  # [1, BN] float32: group g's scales (zero points) of the BN columns
            if not k_major:
                return load_row(ref, g)
            col = pltriton.load(ref.at[:, pl.ds(g, 1)], mask=cmask[:, None], other=0)  # [BN, 1] of [N, K/G]
            return col.astype(jnp.float32).reshape(1, bn)

        def load_unit(u):  # raw tiles of unit u (clamped to the last): packed [hb, BN] (K-major: [BN, hb]),
            u = jnp.minimum(u, n_units - 1)  # scale, zero of its group
            g = u // sub
            rows = pl.ds(pl.multiple_of(u * hb, hb), hb)
            if k_major:
                p = pltriton.load(w_ref.at[:, rows], mask=cmask[:, None], other=0)
            else:
                p = load_cols(w_ref, rows)
            return p, load_group(s_ref, g), (load_group(z_ref, g) if z_ref is not None else None)

        def group_terms(raw):
            """-> (lo, hi, s, z): the two nibble planes as floats and the group's scale; z is the zero point
            still to take out (asm, asymmetric: the planes hold u), else None (the planes hold u - z)."""
            p, s, z = raw
            if cfg.asm_dequant:
                lo, hi = _int4_planes(p, 0 if z is not None else 8, interpret)
                return lo, hi, s, z
            p = p.astype(jnp.int32)
            zf = 8.0 if z is None else (z.reshape(bn, 1) if k_major else z)  # along the plane's BN axis
            return _nibble_minus(p & 0xF, zf, fast), _nibble_minus(p >> 4, zf, fast), s, None

        def dot(xt, plane):  # [BM, hb] x plane [hb, BN] (K-major: [BN, hb]) -> [BM, BN] float32
            return lax.dot_general(xt, plane.astype(xt.dtype), (((1,), (1 if k_major else 0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

        load_step = lambda i: tuple(load_unit((first + i) * ups + j) for j in range(ups))  # noqa: E731
        if cfg.kernel == "gemv":  # [hb, BN] tiles only: a K-major int4 GEMV is qmatmul_dp4a's
            def step(i, acc, raws):
                for j in range(ups):
                    lo, hi, s, z = group_terms(raws[j])
                    lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
                    if z is not None:
                        lo, hi = lo - z, hi - z
                    k0 = unit_col((first + i) * ups + j)
                    xl = x_ref[0, pl.ds(k0, hb)].astype(jnp.float32)
                    xh = x_ref[0, pl.ds(k0 + g2, hb)].astype(jnp.float32)
                    acc = acc + (xl[:, None] * lo + xh[:, None] * hi) * s
                return acc

            acc = _gemv_loop(steps, step, load_step, jnp.zeros((hb, bn), jnp.float32), cfg.prefetch, cfg.unroll)
        else:
            def body(i, acc):
                for j in range(ups):
                    u = (first + i) * ups + j
                    lo, hi, s, z = group_terms(load_unit(u))
                    k0 = unit_col(u)
                    xl = x_ref[:, pl.ds(k0, hb)]
                    xh = x_ref[:, pl.ds(k0 + g2, hb)]
                    if cfg.scale_in_bf16:  # scaled weights: the dots accumulate straight into acc
                        col = (lambda v: v.reshape(bn, 1)) if k_major else (lambda v: v)  # noqa: E731
                        lo, hi = _scale_planes((lo, hi), col(s), None if z is None else col(z), interpret)
                        acc = acc + dot(xl, lo) + dot(xh, hi)
                        continue
                    part = dot(xl, lo) + dot(xh, hi)
                    if z is not None:  # sum_k x (u - z) = x.u - z * sum_k x, per row and column
                        part = part - xs_ref[:, pl.ds(u, 1)] * z
                    acc = acc + part * s
                return acc
            acc = lax.fori_loop(0, steps, body, jnp.zeros((cfg.block_m, bn), jnp.float32))
    pltriton.store(o_ref, acc.astype(o_ref.dtype), mask=jnp.broadcast_to(cmask[None, :], acc.shape))


@functools.partial(jax.jit, static_argnames=("cfg", "out_dtype", "interpret"))
def gpu_qmatmul(x, sx, w, out=None, *, cfg: TileConfig, out_dtype, interpret: bool = False):
    """x: [Mp, K] (int8 for W8A8 with sx [Mp, 1] float32, else float with sx None), Mp a multiple of
    ``cfg.block_m``; w: a validated format -> [Mp, N] in ``out_dtype`` (split_k == 1) or float32 partial
    sums [split_k, Mp, N]. An ``Int8Weight`` may be stored [K, N] or K-major [N, K]; an ``Int4Weight`` K-major on
    the dot only."""
    if cfg.asm_dequant and not isinstance(w, Int4Weight):
        raise ValueError(f"TileConfig.asm_dequant is for Int4Weight only; got {type(w).__name__}")
    k_major = isinstance(w, (Int8Weight, Int4Weight)) and w.k_major
    if (isinstance(w, Int4Weight) and k_major and cfg.kernel == "gemv") or cfg.kernel == "dp4a":
        raise ValueError("the integer-dot GEMV (a K-major Int4Weight's 'gemv', any 'dp4a' config) runs "
                         "qmatmul_dp4a.dp4a_gemv, not this kernel")
    mp, k = x.shape
    n = w.out_features
    bm, bn = cfg.block_m, cfg.block_n
    fmt = "w8a8" if isinstance(w, W8A8Weight) else "int8" if isinstance(w, Int8Weight) else "int4"
    group = w.group if isinstance(w, Int4Weight) else 0
    grid = (mp // bm, pl.cdiv(n, bn), cfg.split_k)
    full_k = lambda rows: pl.BlockSpec((rows, bn), lambda mi, ni, si: (0, ni))
    x_spec = pl.BlockSpec((bm, k), lambda mi, ni, si: (mi, 0))
    if fmt == "int4":
        operands = [x, w.packed, w.scale] + ([w.zero] if w.zero is not None else [])
        rows_of = (lambda cols: pl.BlockSpec((bn, cols), lambda mi, ni, si: (ni, 0))) if k_major else full_k  # noqa: E731
        specs = [x_spec, rows_of(k // 2), rows_of(k // group)] + ([rows_of(k // group)] if w.zero is not None else [])
        if _takes_x_sums(cfg, w.zero is not None):  # a unit's sum covers its lo and hi columns
            sub, _ = _int4_units(group, cfg.block_k)
            xs = x.astype(jnp.float32).reshape(mp, k // group, 2, sub, group // 2 // sub).sum(axis=(2, 4))
            operands.append(xs.reshape(mp, k // group * sub))
            specs.append(pl.BlockSpec((bm, k // group * sub), lambda mi, ni, si: (mi, 0)))
    else:
        operands = [x] + ([sx] if fmt == "w8a8" else []) + [w.qweight, w.scale.reshape(1, n)]
        w_spec = pl.BlockSpec((bn, k), lambda mi, ni, si: (ni, 0)) if fmt == "w8a8" or k_major else full_k(k)
        specs = ([x_spec] + ([pl.BlockSpec((bm, 1), lambda mi, ni, si: (mi, 0))] if fmt == "w8a8" else [])
                 + [w_spec, full_k(1)])
    if cfg.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((mp, n), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda mi, ni, si: (mi, ni))
    else:
        out_shape = jax.ShapeDtypeStruct((cfg.split_k, mp, n), jnp.float32)
        out_spec = pl.BlockSpec((pl.squeezed, bm, bn), lambda mi, ni, si: (si, mi, ni))
    aliases = {}
    if out is not None:  # tests: a poisoned buffer that the kernel must overwrite everywhere
        if out.shape != out_shape.shape or out.dtype != out_shape.dtype:
            raise ValueError(f"out must be {out_shape.dtype} {out_shape.shape}; got {out.dtype} {out.shape}")
        aliases = {len(operands): 0}
        operands, specs = operands + [out], specs + [out_spec]
    kernel = functools.partial(_kernel, fmt=fmt, cfg=cfg, n_total=n, k_total=k, group=group,
                               has_zero=fmt == "int4" and w.zero is not None, k_major=k_major,
                               aliased=out is not None,
                               interpret=interpret)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, in_specs=specs, out_specs=out_spec,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name=f"qmatmul_{fmt}_{cfg.kernel}",
    )(*operands)
