"""Can a K-major int4 GEMV with integer dot products (dp4a) read int4 weights near bandwidth at M=1? (issue 3)

The Pallas int4 kernels on the ``[K/2, N]`` packing read GLM-4-9B's gate_up at about half of copy bandwidth at M=1
(2.0x bf16; floor 3x): issue-bound at ~4.8 instructions a weight (``qmatmul_h100_notes.md``). The library's
``kernels_pallas/qmatmul_dp4a.py`` (grown from this diagnosis) stores the packed bytes K-major and lets one PTX
``dp4a`` multiply four nibbles by four int8 digits of the activation (about 1.25 instructions a weight); XLA
writes the digits before each launch (``digit_planes``). This times, at M=1 on GLM-4-9B's four shapes, per layer
(``bench_qmatmul.time_layers``, distinct layers unrolled in one jit):

* ``bf16``: XLA's bf16 dot; ``ours_int4_kn`` / ``ours_int4_nk``: this project's int4 dispatch (tuned table) on
  the ``[K/2, N]`` / K-major packing;
* ``dp4a_*``: the library GEMV at the given tile (block_n, block_k, warps) -- the same x for every layer, so XLA
  computes the digits once (CSE), as in ``bench_qmatmul``;
* with ``--distinct-x`` every layer gets its own x, as in the model, where each matmul pays its digit prep
  (``*_dx`` rows; bf16 and kn rows too, for the same-run ratios);
* ``dp4a_table_digits_*`` (``--digits kernel,xla``): the table's tile with its activation digits from one Pallas
  launch (``digit_planes_pallas``) or from XLA's fusions (``digit_planes``); with ``--distinct-x`` each call pays
  its prep, as in the model;
* ``fused_*`` (``--fused``): a prototype that computes the digits inside the kernel (row absmax in a first pass
  over x, digits per step, amortized over the block_n rows a thread holds), so no XLA prep runs.

    python experiments/diag_int4_dp4a.py --out $OUT [--distinct-x] [--fused] [--no-tiles]     # GPU

(``--fused`` at every tile of ``FUSED`` on all four shapes compiled for minutes on the H100 -- down's 107 groups
in steps of 4-8 groups, unrolled twice -- and the call ran out of time; give it ``--shapes gate_up``. The error
check reads float32 outputs: a run of 2026-11-26 compared bf16-rounded ones and dropped down / qkv / o as "wrong"
at 2.3-2.5e-3, which is bf16's rounding, not the kernel's.)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

import bench_common  # noqa: E402
from bench_qmatmul import layers_for, random_weight  # noqa: E402
from diag_int8_dot import time_variant, write_diag  # noqa: E402
from kernels_pallas import qmatmul_tiles  # noqa: E402
from kernels_pallas.qmatmul_dp4a import _dp4a, dp4a_gemv  # noqa: E402
from kernels_pallas.qmatmul_tiles import TileConfig  # noqa: E402
from kernels_pallas.quantized_matmul import (SPLIT_STEPS, fit_config, quantized_matmul,  # noqa: E402
                                             quantized_matmul_reference)

SHAPES = {"gate_up": (4096, 27392), "down": (13696, 4096), "qkv": (4096, 4608), "o": (4096, 4096)}
# library GEMV tiles (bn, bk, warps, split_k): split_k runs of K's steps a program each (down: 7 steps of 16 groups)
TILES = [(2, 4096, 4, 1), (4, 2048, 2, 1), (4, 1024, 2, 1), (2, 2048, 2, 1), (8, 2048, 4, 1), (2, 4096, 2, 4),
         (4, 2048, 2, 4), (4, 2048, 2, 7), (2, 4096, 4, 4), (8, 1024, 2, 7)]
FUSED = [(8, 512, 4), (8, 1024, 4), (16, 512, 4), (8, 2048, 8), (16, 1024, 8), (4, 2048, 4), (16, 256, 4),
         (32, 256, 8)]


def _fused_kernel(x_ref, w_ref, s_ref, o_ref, *, n_total, kg, ug, bn, g2, interpret):
    # x_ref [K/G, 2, G/2] float (lo / hi halves of each group); w_ref [bn, K/G, G/2] uint8; s_ref [bn, K/G];
    # o_ref [bn] float32. Pass 1: the row's absmax; pass 2: digits of each step's groups, dp4a, zero-point term.
    rows = pl.program_id(0) * bn + jnp.arange(bn)
    rmask = rows < n_total
    steps = pl.cdiv(kg, ug)

    def halves(i):
        gm = i * ug + jnp.arange(ug) < kg
        gs = pl.ds(jnp.asarray(i * ug, jnp.int32), ug)
        ld = lambda h: pltriton.load(x_ref.at[gs, pl.ds(h, 1), :], mask=gm[:, None, None], other=0).astype(  # noqa: E731
            jnp.float32).reshape(ug, g2)
        return gm, gs, ld(0), ld(1)

    amax = jnp.zeros((ug, g2), jnp.float32)
    for i in range(steps):
        _, _, lo, hi = halves(i)
        amax = jnp.maximum(amax, jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    step = jnp.maximum(jnp.max(amax), 1e-30) / SPLIT_STEPS
    inv = 1.0 / step
    shape = (bn, ug, g2)
    tile, corr = jnp.zeros(shape, jnp.float32), jnp.zeros((bn, ug), jnp.float32)
    for i in range(steps):
        gm, gs, lo, hi = halves(i)
        xs = [jnp.floor(v * inv + 0.5) for v in (lo, hi)]  # |xs| <= 16256 (+1 at a rounding edge: fits int16)
        dh = [jnp.floor(v * (1.0 / 128.0) + 0.5) for v in xs]
        digits = [dh[0], xs[0] - 128.0 * dh[0], dh[1], xs[1] - 128.0 * dh[1]]
        digits = [jnp.broadcast_to(d.astype(jnp.int32).astype(jnp.int8)[None], shape) for d in digits]
        xg = jnp.sum(xs[0] + xs[1], axis=1)  # [ug]
        sm = rmask[:, None] & gm[None, :]
        p = pltriton.load(w_ref.at[:, gs, :], mask=sm[:, :, None], other=0)
        s = pltriton.load(s_ref.at[:, gs], mask=sm, other=0.0).astype(jnp.float32)
        tile = _dp4a(p, *digits, jnp.broadcast_to(s[:, :, None], shape), tile, interpret)
        corr = corr + s * 8.0 * xg[None, :]
    acc = jnp.sum(jnp.sum(tile, axis=2), axis=1) - jnp.sum(corr, axis=1)
    pltriton.store(o_ref, acc * step, mask=rmask)


@functools.partial(jax.jit, static_argnames=("bn", "bk", "warps", "interpret"))
def fused_gemv(x, w, *, bn, bk, warps, interpret=False):
    """x [1, K]; w a symmetric K-major Int4Weight -> [1, N] float32 (the prototype above)."""
    n, k, group = w.out_features, w.in_features, w.group
    kg, g2, ug = k // group, group // 2, bk // group
    kernel = functools.partial(_fused_kernel, n_total=n, kg=kg, ug=ug, bn=bn, g2=g2, interpret=interpret)
    return pl.pallas_call(
        kernel, grid=(pl.cdiv(n, bn),),
        in_specs=[pl.BlockSpec((kg, 2, g2), lambda i: (0, 0, 0)), pl.BlockSpec((bn, kg, g2), lambda i: (i, 0, 0)),
                  pl.BlockSpec((bn, kg), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((bn,), lambda i: (i,)), out_shape=jax.ShapeDtypeStruct((n,), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=warps, num_stages=1), interpret=interpret,
        name="int4_dp4a_fused_prep",
    )(x.reshape(kg, 2, g2), w.packed.reshape(n, kg, g2), w.scale)[None, :]


def gemv_cfg(bn, bk, w, s=1):
    return TileConfig(kernel="gemv", block_m=1, block_n=bn, block_k=bk, split_k=s, num_warps=w, num_stages=1)


def check_tiles(out: str, interpret: bool, block_ns=(1, 2, 4, 8, 16)) -> None:
    """Every (block_n, groups a step, group, warps) that ``tile_fits`` admits, with a split, on a small ragged
    problem (3.5 steps of K, 5 programs and one row of N): the max error over the fixed-point bound, per tile
    (``ok``: within it, split or not). The JSON is rewritten after every tile (a cut run keeps its rows)."""
    from kernels_pallas.qmatmul_dp4a import tile_fits
    rows = []
    path = Path(out) / f"diag_int4_dp4a_tiles_{bench_common.gpu_tag()}.json"
    Path(out).mkdir(parents=True, exist_ok=True)
    for g in (64, 128):
        for bn in block_ns:
            for ug in (1, 2, 4, 8, 16, 32):
                for w in (1, 2, 4, 8):
                    if not tile_fits(bn, ug * g, w):
                        continue
                    k, n = (3 * ug + max(ug // 2, 1)) * g, 5 * bn + 1
                    x = jax.random.normal(jax.random.key(k + n), (1, k), jnp.float32).astype(jnp.bfloat16)
                    q = random_weight(jax.random.key(n), f"int4_g{g}_sym", k, n).with_layout(True)
                    ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
                    step = jnp.max(jnp.abs(x.astype(jnp.float32))) / SPLIT_STEPS
                    bound = step / 2 * jnp.sum(jnp.abs(q.dequantize(jnp.float32)), axis=0) * 1.01 + 1e-5
                    row = dict(group=g, block_n=bn, groups_a_step=ug, warps=w,
                               bytes_a_thread=bn * ug * g // 2 // (32 * w))
                    for sp in (1, 2):
                        try:
                            y = quantized_matmul(x, q, config=gemv_cfg(bn, ug * g, w, sp), out_dtype=jnp.float32,
                                                 interpret=interpret, _poison=True)
                            row[f"excess_s{sp}"] = float(jnp.max(jnp.abs(y[0] - ref[0]) - bound))
                        except Exception as ex:  # noqa: BLE001 -- recorded, the others go on
                            row[f"excess_s{sp}"] = bench_common.error_text(ex)
                    row["ok"] = all(isinstance(row[f"excess_s{sp}"], float) and row[f"excess_s{sp}"] <= 0
                                    for sp in (1, 2))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    path.write_text(json.dumps({"device": bench_common.device_info(), "versions":
                                                bench_common.versions(), "rows": rows}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=".")
    ap.add_argument("--distinct-x", action="store_true", help="also time with a distinct x per layer")
    ap.add_argument("--fused", action="store_true", help="also time the in-kernel digit prototype")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-tiles", action="store_true", help="only the table's tile (ours_int4_nk), not TILES")
    ap.add_argument("--tiles", default=None, help="bn:bk:warps:split,... instead of TILES")
    ap.add_argument("--check-tiles", action="store_true",
                    help="only check every tile shape that tile_fits admits against the reference (no timing)")
    ap.add_argument("--tile-rows", default="1,2,4,8,16", help="--check-tiles: the block_n values to check")
    ap.add_argument("--timing", choices=("wall", "trace"), default="wall",
                    help="trace: a call's GPU span in a profiler trace (bench_common.gpu_span_per_call; the int4 "
                         "GEMVs' wall time is host-bound)")
    ap.add_argument("--digits", default="", help="also time the table's tile with each of these digit preps "
                    "(dp4a_gemv's digits: kernel, xla, auto; kernelN: the kernel with N warps), e.g. kernel,kernel32,xla "
                    "(use with --distinct-x)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every variant this many times, round after round (run-to-run spread)")
    args = ap.parse_args()
    tiles = TILES if args.tiles is None else [tuple(map(int, t.split(":"))) for t in args.tiles.split(",")]
    interpret = jax.default_backend() != "gpu"
    if args.check_tiles:
        return check_tiles(args.out, interpret, tuple(map(int, args.tile_rows.split(","))))
    bw = None if interpret else bench_common.measure_copy_bandwidth()
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        layers = 1 if interpret else layers_for(k, n, args.layers, 512)
        keys = jax.random.split(jax.random.key(0), layers)
        kn = [random_weight(kk, "int4_g128_sym", k, n) for kk in keys]
        nk = [w.with_layout(True) for w in kn]
        xs = [jax.random.normal(jax.random.key(2 + i), (1, k), jnp.float32).astype(jnp.bfloat16) for i in range(layers)]
        x = xs[0]
        ref = quantized_matmul_reference(x, kn[0], out_dtype=jnp.float32)
        err = lambda y: float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))  # noqa: E731
        nbytes = kn[0].nbytes()
        variants = []  # (label, fn(x, w), weights, per-layer x?)
        if not interpret:
            wb = [w.dequantize(jnp.bfloat16) for w in kn]
            variants += [("bf16", lambda x, w: jnp.dot(x, w), wb, 2 * k * n, None),
                         ("ours_int4_kn", lambda x, w: quantized_matmul(x, w), kn, nbytes,
                          err(quantized_matmul(x, kn[0], out_dtype=jnp.float32)))]
        f = lambda x, w: quantized_matmul(x, w, interpret=interpret)  # noqa: E731 -- the tuned table's tile
        e_nk = err(quantized_matmul(x, nk[0], out_dtype=jnp.float32, interpret=interpret))  # not bf16-rounded
        variants.append(("ours_int4_nk", f, nk, nbytes, e_nk))
        for bn, bk, wp, sp in ([] if args.no_tiles else tiles):
            c = gemv_cfg(bn, bk, wp, sp)
            f = lambda x, w, c=c: quantized_matmul(x, w, config=c, interpret=interpret)  # noqa: E731
            e = err(quantized_matmul(x, nk[0], config=c, out_dtype=jnp.float32, interpret=interpret))
            variants.append((f"dp4a_bn{bn}_bk{bk}_w{wp}_s{sp}", f, nk, nbytes, e))
        if args.digits:  # the table's tile, as ours_int4_nk runs it
            c = fit_config(qmatmul_tiles.lookup(qmatmul_tiles.device_key(jax.devices()[0].device_kind), nk[0].name, 1,
                                                k, n), nk[0], 1)
        for label in filter(None, args.digits.split(",")):
            dg, dw = ("kernel", int(label[6:])) if label[6:].isdigit() else (label, 8)  # kernelN: N warps
            f = lambda x, w, c=c, dg=dg, dw=dw: dp4a_gemv(x, w, cfg=c, digits=dg, digit_warps=dw,  # noqa: E731
                                                                 out_dtype=x.dtype, interpret=interpret)
            e = err(dp4a_gemv(x, nk[0], cfg=c, digits=dg, digit_warps=dw, interpret=interpret))
            variants.append((f"dp4a_table_digits_{label}", f, nk, nbytes, e))
        if args.fused:
            for bn, bk, wp in FUSED:
                f = lambda x, w, bn=bn, bk=bk, wp=wp: fused_gemv(x, w, bn=bn, bk=bk, warps=wp, interpret=interpret)  # noqa: E731
                try:
                    e = err(f(x, nk[0]))
                except Exception as ex:  # noqa: BLE001 -- recorded, the others go on
                    rows.append({"shape": name, "m": 1, "variant": f"fused_bn{bn}_bk{bk}_w{wp}",
                                 "error": bench_common.error_text(ex)})
                    continue
                variants.append((f"fused_bn{bn}_bk{bk}_w{wp}", f, nk, nbytes, e))
        for rnd in range(1 if interpret else args.rounds):
            for label, fn, ws, nb, e in variants:
                if e is not None and e > 2e-3:
                    if rnd == 0:
                        rows.append({"shape": name, "m": 1, "variant": label, "error": f"wrong: rel err {e:.3g}"})
                        print(json.dumps(rows[-1]), flush=True)
                    continue
                if interpret:
                    rows.append({"shape": name, "m": 1, "variant": label, "rel_err_vs_f32": e})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                time_variant(rows, name, 1, label, fn, x, ws, nb, e, bw, timing=args.timing)
                rows[-1]["round"] = rnd
                if args.distinct_x:  # each layer its own x: the digit prep is no longer shared
                    pairs = list(zip(ws, xs))
                    time_variant(rows, name, 1, label + "_dx", lambda _, wx, fn=fn: fn(wx[1], wx[0]), x, pairs, nb,
                                 e, bw, timing=args.timing)
                    rows[-1]["round"] = rnd
        write_diag(rows, bw, args.out, "diag_int4_dp4a")  # after every shape: a cut run keeps what it measured


if __name__ == "__main__":
    main()
