"""GPU Pallas GEMV (Triton lowering): one row of x times a K-major ``Int4Weight`` or ``Int8Weight`` through
integer dot products (``dp4a_gemv``).

``y[1, N] = x[1, K] @ dequant(w)[K, N]`` for ``w.k_major`` (``packed[N, K/2]``, viewed ``[N, K/G, G/2]``: row n,
group g, byte j holds k = g*G + j in its low nibble and g*G + G/2 + j in its high one; ``scale`` / ``zero``
``[N, K/G]``). The activation row is written as two int8 digits per element, the ``xla_split`` int8 path's fixed
point (``quantized_matmul.split_digits``: ``xs = round(x / step) = 128 * hi + lo``, 15 bits) with a step per group
of the weight (``act_digits``' planes layout: ``step[g]`` from the group's absmax, the only approximation); per group
the kernel needs ``sum_k u[k, n] * xs[k]`` (nibbles u in [0, 15]) and takes the zero point out once per group and
row: ``sum_k (u - z) xs = sum_k u xs - z * X[g]`` with ``X[g] = sum_{k in g} xs[k]`` (z = 8 for a symmetric
weight). So

    y[n] = sum_g s[n, g] * step[g] * (sum_{k in g} u[k, n] xs[k] - z[n, g] X[g])

One PTX ``dp4a`` multiplies four unsigned bytes by four signed bytes and adds them to an int32: per four packed
bytes (eight weights) the asm (``_ASM``) masks out the low nibbles and shifts out the high ones as bytes, runs
four ``dp4a`` (both nibble planes times both digits of their halves of x), recombines the digits with one
shift, converts to float32 and adds ``s[n, g]`` times it to lane 0 of the running sum -- about 1.25
instructions a weight (the float32 unpacking of the ``[K, N]`` kernels costs ~4.8). Lanes 1-3 of the running sum
stay zero. Interpret mode (no PTX on the CPU) computes the same sums with ``jnp``.

Grid ``(N / block_n, split_k)``: each program owns ``block_n`` rows of N and one of ``split_k`` equal runs of
K's steps of ``block_k / G`` groups (the steps written out; the last may run past K / G and is masked, e.g.
down_proj's 107 groups), keeping one ``[block_n, block_k / G, G/2]`` running sum and one ``[block_n, block_k / G]``
zero-point term, reduced once at the end into its row of the ``[split_k, N]`` float32 partials; the wrapper sums
them (XLA fuses that sum into the consumer's cast). With one split the kernel writes the output in its dtype, so
no convert kernel follows (1.2-1.7 us a call on the H100). A split gives a K-long, N-short weight (down_proj: 1024
programs of 27 KB each without one) the program count of a wide one, but its partials cost a kernel too: the H100
table now runs down_proj unsplit (bn2 bk2048, one warp: 13.5 us against 15.5 with split 4, GPU time in a profiler
trace). The digit planes, group sums and steps come from one Pallas launch before the GEMV (``digit_planes_pallas``;
a step per group since session 25, so the launch spreads over ``DIGIT_GROUPS`` groups a program; until then one
program took the row's absmax first, 3.2 us for down_proj's K = 13696 in a decode step; before session 22 down_proj
took XLA's fusions, ``digit_planes``, until the kernel's quotient took five instructions a element,
``quantize_rows.round_quotient``): XLA wrote them in several
small kernels a GEMV (an all-K-major int4 decode step ran ~1.4 ms of small XLA fusions against bf16's ~0.6,
``qmatmul_diag/decode_step_profiles_h100.json``); one launch took 2.1-2.2 us off each qkv / o / gate_up call but
1.1 us onto down's (K = 13696 in one program, ``qmatmul_diag/dp4a_digits_kernel_h100.json``), and all-K-major int4
decode went from 3.91 to 3.43-3.53 ms/token.
Measured on the H100 (``experiments/results/qmatmul_h100.md`` run 13, GPU time in a profiler trace): gate_up
4096 -> 27392 at 0.93 of copy bandwidth, down 13696 -> 4096 at 0.75, against about 0.5 for the ``[K, N]`` int4
kernels.

A K-major ``Int8Weight`` (``qweight[N, K]`` int8, ``scale[N]``; TileConfig ``kernel="dp4a"``, K a multiple of
``INT8_GROUP``) takes the same planes with G = ``INT8_GROUP`` and the same grid; each group's two halves load as
``[block_n, block_k / G, G/2]`` int8 tiles (the weight viewed ``[N, K/G, 2, G/2]``) and ``_ASM8`` runs four signed
``dp4a`` per four bytes of each half (hi digits, shift, lo digits), then ``fma`` with ``scale[n] * step[g]``: no
zero point, so no group sums. The planes' producers (``add_rms_norm(..., digits=G)``, ``swiglu.swiglu_digits``,
``digit_planes_pallas``) are the int4 GEMV's, and they spread over many programs, where the ``xla_split`` path's
rows take one step a row (one program for the row's absmax, or XLA's two fusions: 1.9-2.6 us a call at batch 1 on
the H100, ``experiments/results/qmatmul_diag/s26_int8_rows/``). Not yet measured on a GPU: the H100 table has no
``dp4a`` entry, so the dispatch does not pick it until ``tune_qmatmul.py`` times it.

Reference: ``quantized_matmul.quantized_matmul_reference`` (the dispatcher's truth for every path).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .act_digits import ActDigits, digit_out_shapes, planes_geometry, store_planes
from .qmatmul_tiles import TileConfig
from .quant_formats import Int4Weight, Int8Weight, QuantFormatError
from .quantized_matmul import split_digits

BYTES_PER_THREAD = 16  # at least this many packed bytes a thread (tile_fits)
DIGIT_GROUPS, DIGIT_WARPS = 4, 4  # digit_planes_pallas: groups a program, warps; H100, session 25
# (results/qmatmul_diag/s25_digits/group_steps/): K = 4096 1.34 us (8 groups a program 1.30, 16 with 8 warps 1.39),
# K = 13696 2.59 us (the one-program row-step prep before it: ~3.05)
MAX_ROWS_A_PASS = 4  # at most this many rows of N under one pass of the CTA's threads (tile_fits)
INT8_GROUP = 128  # a K-major Int8Weight's planes: a step per 128 of K, the int4 g128 GEMV's layout (same producers)


def planes_group(w) -> int | None:
    """The group G of the planes (``act_digits``) that this GEMV takes for weight ``w``: a K-major
    ``Int4Weight``'s own group, ``INT8_GROUP`` for a K-major ``Int8Weight`` whose K it divides; else None."""
    if isinstance(w, Int4Weight) and w.k_major:
        return w.group
    if isinstance(w, Int8Weight) and w.k_major and w.in_features % INT8_GROUP == 0:
        return INT8_GROUP
    return None


def tile_fits(block_n: int, block_k: int, num_warps: int) -> bool:
    """Whether the H100 computes a ``[block_n, block_k / G, G / 2]`` packed tile right (``experiments/
    diag_int4_dp4a.py --check-tiles``, ``experiments/results/qmatmul_diag/diag_int4_dp4a_tiles_h100.json``): every
    thread holds >= ``BYTES_PER_THREAD`` bytes (tiles of 2-4 bytes a thread let a four-byte asm pack span rows or
    groups: lanes summed under the wrong scale), and, with more than ``MAX_ROWS_A_PASS`` rows, one pass of the
    threads (16 bytes each) spans at most that many rows, i.e. a row's step (block_k / 2 bytes) is >= a quarter of
    the pass: all 12 failing tiles of the check spanned 8 or 16 rows, all 61 passing ones 4 or fewer. The cause
    (Triton's layout for the running sum, presumably) is not pinned down. ``quantized_matmul.fit_config`` adapts a
    tuned tile until it fits."""
    pass_bytes = BYTES_PER_THREAD * 32 * num_warps
    return (block_n * block_k // 2 >= pass_bytes
            and (block_n <= MAX_ROWS_A_PASS or MAX_ROWS_A_PASS * (block_k // 2) >= pass_bytes))

def _asm(regs: str, body: str, n_bytes: int) -> str:
    """The inline PTX of one pack of four elements: ``body`` leaves the group's int32 sum in ``t`` from the
    ``n_bytes`` byte operands ($4 ..); then lane 0 of the float32 out ($0) = running sum + float(t) * scale, the
    scale and the running sum four registers each after the bytes, lanes 1-3 zero."""
    sc = 4 + n_bytes
    return (f"{{\n.reg .b32 {regs};\n.reg .f32 f;\nmov.b32 z, 0;\n{body}cvt.rn.f32.s32 f, t;\n"
            f"fma.rn.f32 $0, f, ${sc}, ${sc + 4};\nmov.b32 $1, 0;\nmov.b32 $2, 0;\nmov.b32 $3, 0;\n}}")


# int4: $4 four packed bytes, $5 / $6 x's hi / lo digits at the low-nibble ks, $7 / $8 at the high-nibble ks (four
# int8 each), $9-$12 the group's scale, $13-$16 the running sum.
_ASM = _asm("lo, hi, t, z", """and.b32 lo, $4, 0x0F0F0F0F;
shr.b32 hi, $4, 4;
and.b32 hi, hi, 0x0F0F0F0F;
dp4a.u32.s32 t, lo, $5, z;
dp4a.u32.s32 t, hi, $7, t;
shl.b32 t, t, 7;
dp4a.u32.s32 t, lo, $6, t;
dp4a.u32.s32 t, hi, $8, t;
""", 5)
# int8: $4 / $5 four int8 weights of the group's low / high half, $6 / $7 x's hi / lo digits there, $8 / $9 in the
# high half, $10-$13 the scale (row scale times the group's step), $14-$17 the running sum.
_ASM8 = _asm("t, z", """dp4a.s32.s32 t, $4, $6, z;
dp4a.s32.s32 t, $5, $8, t;
shl.b32 t, t, 7;
dp4a.s32.s32 t, $4, $7, t;
dp4a.s32.s32 t, $5, $9, t;
""", 6)


def _dp4a(p, xa, xb, xc, xd, sc, acc, interpret: bool):
    """acc + s * sum(u * xs) over each four packed bytes (lane 0; interpret: the same sums, spread over lanes)."""
    if interpret:
        p = p.astype(jnp.int32)
        lo, hi = p & 0xF, p >> 4
        i32 = lambda v: v.astype(jnp.int32)  # noqa: E731
        t = 128 * (lo * i32(xa) + hi * i32(xc)) + lo * i32(xb) + hi * i32(xd)
        return acc + t.astype(jnp.float32) * sc
    return _inline(_ASM, [p, xa, xb, xc, xd, sc, acc])


def _inline(asm: str, args):
    """``asm`` over packs of four elements: the byte operands one register each, the last two (float32 scale,
    running sum) four each; four float32 registers out."""
    out = jax.ShapeDtypeStruct(args[0].shape, jnp.float32)
    regs = ",".join(["r"] * (len(args) + 6))
    return pltriton.elementwise_inline_asm(asm, args=args, constraints="=r,=r,=r,=r," + regs, pack=4,
                                           result_shape_dtypes=[out])[0]


def _dp4a8(p0, p1, xa, xb, xc, xd, sc, acc, interpret: bool):
    """int8 weights: acc + s * sum(w * xs) over each four bytes of both halves of a group (lane 0)."""
    if interpret:
        i32 = lambda v: v.astype(jnp.int32)  # noqa: E731
        t = 128 * (i32(p0) * i32(xa) + i32(p1) * i32(xc)) + i32(p0) * i32(xb) + i32(p1) * i32(xd)
        return acc + t.astype(jnp.float32) * sc
    return _inline(_ASM8, [p0, p1, xa, xb, xc, xd, sc, acc])


def _kernel(xd_ref, xg_ref, step_ref, w_ref, s_ref, *refs, n_total, n_groups, ug, sps, bn, g2, has_zero, aliased,
            interpret, bits=4):
    # xd_ref [4, K/G, G/2] int8 digit planes; xg_ref [K/G] float32 group sums X; step_ref [K/G] their steps;
    # int4: w_ref [bn, K/G, G/2] uint8, s_ref (z_ref) [bn, K/G]; int8 (bits=8): w_ref [bn, K/G, 2, G/2] int8 (each
    # group's halves), s_ref [bn] float32; o_ref [1, bn]: this split's float32 partials, or with one split the
    # output itself in its dtype.
    if aliased:  # the poisoned output passed in is the output itself
        refs = refs[:-2] + refs[-1:]
    z_ref, o_ref = refs if has_zero else (None, *refs)
    rows = pl.program_id(0) * bn + jnp.arange(bn)
    rmask = rows < n_total
    shape = (bn, ug, g2)
    tile, corr = jnp.zeros(shape, jnp.float32), jnp.zeros((bn, ug), jnp.float32)
    first = pl.program_id(1) * sps  # this split's first step
    if bits == 8:
        srow = pltriton.load(s_ref, mask=rmask, other=0.0).astype(jnp.float32)  # [bn] the rows' scales
    for i in range(sps):
        g0 = ((first + i) * ug).astype(jnp.int32)  # traced: the last step may run past K/G (masked)
        gm = g0 + jnp.arange(ug) < n_groups
        gs = pl.ds(g0, ug)
        sm = rmask[:, None] & gm[None, :]
        xs = [pltriton.load(xd_ref.at[pl.ds(j, 1), gs, :], mask=gm[None, :, None], other=0) for j in range(4)]
        xst = pltriton.load(step_ref.at[gs], mask=gm, other=0.0)  # the groups' activation steps
        if bits == 8:
            ps = [pltriton.load(w_ref.at[:, gs, pl.ds(h, 1), :], mask=sm[:, :, None, None], other=0).reshape(shape)
                  for h in range(2)]
            s = srow[:, None] * xst[None, :]
            tile = _dp4a8(*ps, *(jnp.broadcast_to(x, shape) for x in xs), jnp.broadcast_to(s[:, :, None], shape),
                          tile, interpret)
            continue
        p = pltriton.load(w_ref.at[:, gs, :], mask=sm[:, :, None], other=0)
        s = pltriton.load(s_ref.at[:, gs], mask=sm, other=0.0).astype(jnp.float32) * xst[None, :]
        z = 8.0 if z_ref is None else pltriton.load(z_ref.at[:, gs], mask=sm, other=0).astype(jnp.float32)
        xg = pltriton.load(xg_ref.at[gs], mask=gm, other=0.0)
        tile = _dp4a(p, *(jnp.broadcast_to(x, shape) for x in xs), jnp.broadcast_to(s[:, :, None], shape), tile,
                     interpret)
        corr = corr + s * z * xg[None, :]
    acc = jnp.sum(jnp.sum(tile, axis=2), axis=1) - jnp.sum(corr, axis=1)
    pltriton.store(o_ref, acc[None, :].astype(o_ref.dtype), mask=rmask[None, :])


def digit_planes(x, group: int):
    """x [1, K] float -> (digits [4, K/G, G/2] int8: hi and lo digits of the low then the high half of each
    group; group sums X [K/G] float32; steps [K/G] float32, one a group) in XLA's ops (``act_digits``' planes)."""
    k = x.shape[1]
    step, d = split_digits(x.astype(jnp.float32).reshape(k // group, group), axis=1)  # [K/G, 1], [2 K/G, G]
    d = d.reshape(2, k // group, 2, group // 2)  # digit, group, half, j
    planes = jnp.stack([d[0, :, 0], d[1, :, 0], d[0, :, 1], d[1, :, 1]])
    xs = 128 * d[0].astype(jnp.int32) + d[1].astype(jnp.int32)  # [K/G, 2, G/2]
    return planes, jnp.sum(xs, axis=(1, 2)).astype(jnp.float32), step.reshape(k // group)


def _prep_kernel(x_ref, planes_ref, xg_ref, step_ref, *, n_groups, rows, interpret):
    # Program i takes groups [i * rows, (i + 1) * rows) of x_ref [K/G, 2, G/2] (the group halves; groups past K/G
    # masked) -> their rows of planes_ref [4, K/G, G/2] int8, xg_ref and step_ref [K/G] float32.
    g2 = x_ref.shape[2]
    row0 = pl.program_id(0) * rows
    gm = row0 + jnp.arange(rows) < n_groups
    halves = [pltriton.load(x_ref.at[pl.ds(row0, rows), pl.ds(h, 1), :], mask=gm[:, None, None], other=0.0)
              .reshape(rows, g2).astype(jnp.float32) for h in range(2)]
    store_planes(planes_ref, xg_ref, step_ref, halves, gm, row0, interpret)


def digit_planes_pallas(x, group: int, *, groups: int = DIGIT_GROUPS, num_warps: int = DIGIT_WARPS,
                        interpret: bool = False):
    """``digit_planes`` in one Pallas launch of ``groups`` groups a program: on the GPU the digits, group sums and
    steps come from one kernel instead of XLA's several small fusions around every GEMV (a decode step profile on the
    H100, ``experiments/results/qmatmul_diag/decode_step_profiles_h100.json``). The digits are ``digit_planes``' with
    the quotient x / step correctly rounded (``quantize_rows.round_quotient``, five PTX instructions a element), which
    XLA's form may miss by one step on a few elements."""
    kg, _, g2 = planes_geometry(x.shape[1], group)
    if groups < 1 or groups & (groups - 1):
        raise ValueError(f"groups (a program's groups) must be a power of two; got {groups}")
    kernel = functools.partial(_prep_kernel, n_groups=kg, rows=groups, interpret=interpret)
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(kg, groups),), in_specs=[full((kg, 2, g2))],
        out_specs=[full((4, kg, g2)), full((kg,)), full((kg,))],
        out_shape=digit_out_shapes(1, x.shape[1], group),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="qmatmul_int4_dp4a_digits",
    )(x.reshape(kg, 2, g2))


def check_dp4a_inputs(x, w, cfg: TileConfig) -> None:
    """Raises ``QuantFormatError`` naming what is wrong, before any launch."""
    group = planes_group(w)
    if group is None:
        kind = type(w).__name__ + (" stored [I, O]" if isinstance(w, (Int4Weight, Int8Weight)) and not w.k_major
                                   else "")
        raise QuantFormatError(f"the integer-dot GEMV takes a K-major Int4Weight, or a K-major Int8Weight with K a "
                               f"multiple of {INT8_GROUP}; got {kind} (K={getattr(w, 'in_features', '?')})")
    if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] != w.in_features:
        raise QuantFormatError(f"the integer-dot GEMV takes one row x[1, K={w.in_features}]; got {x.shape}")
    steps = -(-w.in_features // cfg.block_k) if cfg.block_k > 0 else 0
    kernels = ("gemv", "dp4a") if isinstance(w, Int4Weight) else ("dp4a",)
    if cfg.kernel not in kernels or cfg.block_k <= 0 or cfg.block_k % group or not 1 <= cfg.split_k <= steps:
        raise QuantFormatError(f"the integer-dot GEMV needs kernel in {kernels}, block_k a positive multiple of the "
                               f"group ({group}) and 1 <= split_k <= K's steps of block_k ({steps}); got {cfg}")
    if not tile_fits(cfg.block_n, cfg.block_k, cfg.num_warps):
        raise QuantFormatError(
            f"the integer-dot GEMV needs block_n * block_k / 2 >= {BYTES_PER_THREAD} * 32 * num_warps (each "
            f"thread's four-byte packs must be contiguous bytes of one row and group) and, for block_n > "
            f"{MAX_ROWS_A_PASS}, {MAX_ROWS_A_PASS} * block_k / 2 >= {BYTES_PER_THREAD} * 32 * num_warps (tiles whose "
            f"threads span more rows at once computed wrong sums on the H100); got block_n={cfg.block_n}, block_k="
            f"{cfg.block_k}, num_warps={cfg.num_warps} (quantized_matmul.fit_config adapts a tuned tile to fit)")


@functools.partial(jax.jit, static_argnames=("cfg", "out_dtype", "digits", "digit_warps", "interpret"))
def dp4a_gemv(x, w, out=None, *, cfg: TileConfig, out_dtype=jnp.float32, digits: str = "auto",
              digit_warps: int | None = None, interpret: bool = False, x_digits: ActDigits | None = None):
    """x [1, K] float, w a K-major ``Int4Weight`` or ``Int8Weight`` (``planes_group``) -> y [1, N]: in
    ``out_dtype`` written by the kernel with one split, else float32 (the splits' partials summed by XLA). ``cfg``:
    block_n rows of N a program, block_k / G groups a step, split_k runs of K's steps (the program grid's second
    axis), num_warps; out (tests): a NaN-filled
    buffer the kernel must overwrite, [split_k', N] float32 partials (split_k' = the number of non-empty splits,
    ``dp4a_splits``), or [1, N] ``out_dtype`` with one split; digits: "kernel" or "auto" (``digit_planes_pallas``,
    one launch of ``digit_warps`` warps, by default ``DIGIT_WARPS``) or "xla" (``digit_planes``, XLA's
    fusions); x_digits: the planes already written by x's producer (``act_digits``, layout G), used instead of
    either prep."""
    check_dp4a_inputs(x, w, cfg)
    group = planes_group(w)
    if x_digits is not None:
        x_digits.check(1, w.in_features, group)
    if digits not in ("auto", "kernel", "xla"):
        raise ValueError(f"digits must be 'auto', 'kernel' or 'xla'; got {digits!r}")
    digits = "kernel" if digits == "auto" else digits
    digit_warps = DIGIT_WARPS if digit_warps is None else digit_warps
    n, k, int8 = w.out_features, w.in_features, isinstance(w, Int8Weight)
    kg, g2, bn, ug = k // group, group // 2, cfg.block_n, cfg.block_k // group
    splits, sps = dp4a_splits(kg, ug, cfg.split_k)
    odt = jnp.dtype(out_dtype) if splits == 1 else jnp.dtype(jnp.float32)
    if x_digits is not None:
        planes, xg, step = x_digits.digits, x_digits.group_sums, x_digits.step
    elif digits == "kernel":
        planes, xg, step = digit_planes_pallas(x, group, num_warps=digit_warps, interpret=interpret)
    else:
        planes, xg, step = digit_planes(x, group)
    zero = None if int8 else w.zero
    specs = [pl.BlockSpec(planes.shape, lambda i, s: (0, 0, 0)), pl.BlockSpec((kg,), lambda i, s: (0,)),
             pl.BlockSpec((kg,), lambda i, s: (0,))]
    if int8:  # [N, K] -> each group's two halves; a scale per row
        operands = [planes, xg, step, w.qweight.reshape(n, kg, 2, g2), w.scale.astype(jnp.float32)]
        specs += [pl.BlockSpec((bn, kg, 2, g2), lambda i, s: (i, 0, 0, 0)), pl.BlockSpec((bn,), lambda i, s: (i,))]
    else:
        operands = [planes, xg, step, w.packed.reshape(n, kg, g2), w.scale] + ([zero] if zero is not None else [])
        specs += [pl.BlockSpec((bn, kg, g2), lambda i, s: (i, 0, 0))]
        specs += [pl.BlockSpec((bn, kg), lambda i, s: (i, 0))] * (2 if zero is not None else 1)
    out_spec = pl.BlockSpec((1, bn), lambda i, s: (s, i))
    aliases = {}
    if out is not None:
        if out.shape != (splits, n) or out.dtype != odt:
            raise ValueError(f"out must be {odt} ({splits}, {n}); got {out.dtype} {out.shape}")
        aliases = {len(operands): 0}
        operands, specs = operands + [out], specs + [out_spec]
    kernel = functools.partial(_kernel, n_total=n, n_groups=kg, ug=ug, sps=sps, bn=bn, g2=g2,
                               has_zero=zero is not None, aliased=out is not None, interpret=interpret,
                               bits=8 if int8 else 4)
    y = pl.pallas_call(
        kernel, grid=(pl.cdiv(n, bn), splits), in_specs=specs, out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((splits, n), odt), input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        interpret=interpret, name="qmatmul_int8_dp4a_gemv" if int8 else "qmatmul_int4_dp4a_gemv",
    )(*operands)
    return y if splits == 1 else jnp.sum(y, axis=0)[None, :]


def dp4a_splits(n_groups: int, ug: int, split_k: int) -> tuple[int, int]:
    """(non-empty splits, steps per split) for K's ``n_groups`` groups in steps of ``ug`` cut into at most
    ``split_k`` equal runs: 107 groups in steps of 16 (7 steps) with split_k 4 -> 4 splits of 2 steps."""
    steps = -(-n_groups // ug)
    sps = -(-steps // max(1, min(split_k, steps)))
    return -(-steps // sps), sps
