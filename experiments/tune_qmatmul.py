"""Tile sweep for quantized_matmul: writes the tuned table kernels_pallas/tuned/quantized_matmul.json.

GPU only. For each format, M bucket and GLM-4-9B shape, time a short list of candidate TileConfigs (and XLA's
dequantize-then-dot as the candidate ``kernel="xla"``; for int8 also XLA's int8 x int8 dot of
two-digit activations, ``kernel="xla_split"``, at every M) with ``--layers`` distinct weights unrolled in one jit,
and keep the fastest. Entries for the (device, format, M, K, N) problems tuned now are replaced; all other
entries are kept.
A candidate that fails to compile is reported and skipped, and so is one whose output (written into a NaN-poisoned
buffer) is more than 5e-3 off the jnp reference: every candidate is checked before it is timed. ``--budget_s``
bounds the sweep, shared out evenly: each problem may use what is left over the problems left (``problem_budget``),
so a long list early cannot starve the last problems. Each problem times the table's current choice for this device
first (``sweep_order``: the device's own row, a sibling chip's, or ``default_config``), so a problem whose list its
share cuts still writes the best of what it timed -- never slower than what ran before (the entry says
``"partial": true``).

    python experiments/tune_qmatmul.py --out $OUT/quantized_matmul.json

``--rounds R`` times every candidate of a problem R times, round after round, and keeps the best median (the fastest
single sample of a ~10-20 us op is often noise: two sweeps of down_proj's int4 GEMV chose different splits).
``--timing trace`` (the default) times a call by its GPU span in a profiler trace, as ``bench_qmatmul``: wall time
was host-bound for the int4 GEMVs' calls, so earlier sweeps ranked their tiles partly by dispatch noise.

Format ``int8_kmajor`` (``Int8Weight`` stored K-major, ``qweight[N, K]``): the Pallas gemv / dot over
``[block_n, block_k]`` tiles, at one row the integer-dot GEMV over digit planes (``kernel="dp4a"``,
``qmatmul_dp4a``) and the two XLA paths; it is not in the default ``--formats``:

    python experiments/tune_qmatmul.py --formats int8_kmajor --ms 1,8,32 --out $OUT/quantized_matmul.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import bench_common  # noqa: E402
from bench_qmatmul import SHAPES, config_label, gpu_name, layer_timer, layers_for, random_weight  # noqa: E402
from kernels_pallas import qmatmul_tiles  # noqa: E402
from kernels_pallas.qmatmul_tiles import TileConfig  # noqa: E402
from kernels_pallas.quantized_matmul import quantized_matmul, quantized_matmul_reference  # noqa: E402


def T(kernel, bm, bn, bk, split, warps, stages, fast=True, prefetch=False, asm=False, bs=False, unroll=0):
    return TileConfig(kernel=kernel, block_m=bm, block_n=bn, block_k=bk, split_k=split, num_warps=warps,
                      num_stages=stages, fast_dequant=fast, prefetch=prefetch, asm_dequant=asm, scale_in_bf16=bs,
                      unroll=unroll)


def _int4_asm_candidates(m: int, g: int) -> list[TileConfig]:
    """int4 with the PTX nibble unpacking: tensor-core dot tiles at every M (M=1 padded to 16 rows), and the
    gemv at M=1. Each tile is (block_m, block_n, block_k, split_k, warps, stages); block_k one or two groups a
    step, or part of a group (fewer live registers); ``scaled``: weights scaled to bf16 before the dot."""
    def dots(tiles, scaled=False):
        return [T("dot", *tile, asm=True, bs=scaled) for tile in tiles]

    if m <= 32:
        bm, h, q = (16 if m <= 16 else 32), g // 2, g // 4
        c = dots([(bm, 128, h, 4, 4, 4), (bm, 128, h, 8, 4, 4), (bm, 256, h, 8, 8, 3), (bm, 64, h, 8, 4, 4),
                  (bm, 128, q, 8, 4, 4), (bm, 256, h, 4, 8, 3)])
        c += dots([(bm, 128, g, 4, 4, 4), (bm, 128, g, 8, 4, 4), (bm, 64, g, 8, 4, 4)], scaled=True)
        c += dots([(bm, 128, g, 8, 4, 4), (bm, 64, g, 8, 4, 4), (bm, 128, 2 * g, 4, 4, 3), (bm, 256, g, 8, 8, 3),
                   (bm, 128, g, 16, 4, 4), (bm, 128, g, 4, 4, 4)])
        return c + ([T("gemv", 1, 128, g, 8, 4, 3, asm=True, prefetch=True), T("gemv", 1, 128, g, 8, 4, 3, asm=True)]
                    if m == 1 else [])
    if m <= 128:
        return (dots([(64, 128, g, 2, 4, 4), (128, 128, g, 1, 8, 3), (64, 128, g, 4, 4, 4), (128, 128, 2 * g, 1, 8, 3)],
                     scaled=True)
                + dots([(64, 128, g, 2, 4, 4), (128, 128, g, 1, 8, 3), (64, 128, g, 4, 4, 4), (128, 256, g, 1, 8, 3),
                        (64, 256, g, 2, 8, 3)]))
    return (dots([(128, 128, g, 1, 8, 3), (128, 256, g, 1, 8, 3), (128, 128, 2 * g, 1, 8, 3), (64, 128, g, 1, 4, 4),
                  (128, 128, g, 2, 8, 3)], scaled=True)
            + dots([(128, 128, g, 1, 8, 3), (128, 256, g, 1, 8, 3), (64, 128, g, 1, 4, 4), (128, 128, g, 2, 8, 3),
                    (128, 256, 2 * g, 1, 8, 3)]))


CHECK_TOL = 5e-3  # XLA's path and scale_in_bf16 round each dequantized int4 weight to bfloat16 (~1e-3)


def check_against_reference(x, w, cfg: TileConfig, ref) -> float:
    """Relative error of one layer's output (into a NaN-poisoned buffer) against ``ref``, the jnp reference's
    float32 output for (x, w): every candidate is checked before it is timed."""
    out = quantized_matmul(x, w, config=cfg, impl="pallas_gpu", out_dtype=jnp.float32, _poison=True)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


XLA = TileConfig(kernel="xla")
XLA_SPLIT = TileConfig(kernel="xla_split")  # Int8Weight only (quantized_matmul.int8_split_matmul)


def candidates(fmt: str, m: int, wide: bool = False) -> list[TileConfig]:
    """Most likely first. int8 at M <= 32: the split int8 dot second (on an
    H100 it beat the GEMV on down_proj at M=1 and 8, experiments/results/qmatmul_h100_notes.md). ``wide`` appends
    ``_wide_int8_candidates`` for ``[K, N]`` int8 at M <= 32."""
    if wide and fmt == "int8" and m <= 32:
        return candidates(fmt, m) + _wide_int8_candidates(m)
    if fmt == "int8_kmajor":  # [N, K] tiles: a few rows of N a program, each reading along K
        return _kmajor_candidates(m)
    if fmt.startswith("int4") and fmt.endswith("_kmajor"):
        return _int4_kmajor_candidates(m, int(fmt.split("_")[1][1:]))
    cands = _pallas_candidates(fmt, m)
    if fmt == "int8":  # at M > 32 the int8 tensor cores run its 2M digit rows as fast as bf16 runs M rows
        cands.insert(1 if m <= 32 else len(cands), XLA_SPLIT)
    return cands


def _wide_int8_candidates(m: int) -> list[TileConfig]:
    """``--wide``: deeper pipelines and more programs for ``[K, N]`` int8 at M <= 32. An H100 ncu of the dot on
    down_proj at M=32 (``qmatmul_diag/ncu_int8_down_m32_h100.txt``) showed 128 four-warp programs, 0.32 waves a
    SM and DRAM 49% busy, read then as issue-bound (about 6.7 instructions a weight); this list tests the other
    reading, too few bytes in flight. down's K = 13696 = 128 * 107 admits no block_k above 128 and no even split
    (107 is prime), so the depth has to come from stages, wider N tiles and more splits. Session 24's sweep on the
    H100 found none faster than the default list (more stages were slower; ``results/qmatmul_diag/s24_runs/``)."""
    if m == 1:  # gemv: (block_n, block_k, split_k, warps, stages), with and without prefetch
        tiles = [(128, 128, 8, 8, 3), (128, 128, 4, 8, 4), (128, 128, 16, 8, 3), (256, 128, 8, 16, 3),
                 (128, 64, 16, 4, 5), (128, 64, 8, 4, 6), (256, 64, 8, 8, 4), (64, 128, 16, 4, 4)]
        return [T("gemv", 1, *t, prefetch=p) for t in tiles for p in (True, False)]
    bm = 16 if m <= 16 else 32
    tiles = [(128, 128, 4, 4, 6), (128, 128, 4, 4, 8), (128, 128, 4, 8, 6), (128, 128, 8, 4, 6), (128, 128, 2, 4, 8),
             (128, 128, 3, 4, 6), (128, 128, 5, 4, 5), (128, 128, 6, 4, 5), (256, 128, 8, 8, 3), (256, 128, 8, 8, 4),
             (256, 128, 8, 4, 4), (256, 128, 4, 8, 4), (64, 128, 8, 4, 6), (64, 128, 4, 4, 8), (128, 64, 8, 4, 8)]
    return [T("dot", bm, *t) for t in tiles]


def _kmajor_candidates(m: int) -> list[TileConfig]:
    """K-major int8: at M=1 a gemv over [block_n, block_k] tiles with no split (one program per few rows of N,
    the whole K in flight when unrolled); at M <= 32 tensor-core dots with the tiles transposed; the XLA paths."""
    if m == 1:  # (block_n, block_k, warps, unroll); a block_k not dividing K is halved by fit_config
        tiles = [(1, 4096, 4, 1), (1, 4096, 1, 1), (1, 4096, 2, 1), (2, 4096, 2, 1), (1, 2048, 1, 2), (4, 4096, 4, 1),
                 (8, 4096, 8, 1), (2, 2048, 4, 2), (8, 256, 4, 8), (8, 512, 4, 8), (16, 1024, 8, 4), (8, 1024, 4, 4),
                 (4, 512, 4, 8), (16, 512, 8, 8), (8, 128, 4, 16)]
        # the integer-dot GEMV over the int4 GEMV's digit planes (qmatmul_dp4a, kernel "dp4a"): (bn, bk, warps, split)
        dp4a = [(2, 4096, 4, 1), (1, 4096, 4, 1), (2, 2048, 4, 1), (4, 2048, 4, 1), (2, 2048, 2, 1), (4, 1024, 2, 1),
                (1, 2048, 2, 1), (8, 1024, 4, 1), (2, 2048, 4, 7), (4, 2048, 4, 4), (2, 4096, 4, 4), (4, 4096, 4, 1)]
        return ([T("gemv", 1, bn, bk, 1, w, 1, unroll=u) for bn, bk, w, u in tiles]
                + [T("dp4a", 1, bn, bk, s, w, 1) for bn, bk, w, s in dp4a] + [XLA_SPLIT, XLA])
    if m <= 32:
        bm = 16 if m <= 16 else 32
        return [T("dot", bm, 64, 256, 1, 4, 1, unroll=4), T("dot", bm, 32, 256, 1, 4, 1, unroll=8),
                T("dot", bm, 64, 128, 2, 4, 4), T("dot", bm, 128, 128, 4, 4, 4), T("dot", bm, 32, 512, 1, 4, 1, unroll=4),
                T("dot", bm, 64, 128, 1, 4, 1, unroll=8), XLA_SPLIT, XLA]
    return [XLA, XLA_SPLIT, T("dot", 64, 128, 64, 1, 4, 4), T("dot", 128, 128, 64, 1, 8, 3)]


def _int4_kmajor_candidates(m: int, g: int) -> list[TileConfig]:
    """K-major int4: at M=1 the integer-dot GEMV (qmatmul_dp4a; block_n rows a program, block_k / g groups a step,
    the tiles the H100 diagnosis ranked first), else the PTX-unpacking dot tiles over [block_n, g/2] planes."""
    if m == 1:  # (block_n, block_k, warps, split_k); a split cuts K's steps into runs (a K-long weight: down)
        tiles = [(2, 4096, 4, 1), (4, 2048, 2, 1), (2, 4096, 4, 4), (4, 2048, 2, 7), (4, 2048, 2, 4), (2, 2048, 4, 7),
                 (2, 2048, 2, 7), (4, 2048, 4, 7), (2, 4096, 2, 4), (4, 4096, 4, 4), (8, 1024, 2, 7), (4, 1024, 2, 14),
                 (2, 1024, 4, 14), (4, 4096, 4, 2), (2, 2048, 2, 1), (4, 4096, 4, 1), (8, 2048, 4, 1), (4, 16384, 4, 1)]
        return [T("gemv", 1, bn, bk, s, w, 1) for bn, bk, w, s in tiles] + [XLA]
    return _int4_asm_candidates(m, g) + [XLA]


def _pallas_candidates(fmt: str, m: int) -> list[TileConfig]:
    if fmt.startswith("int4"):  # PTX-unpacking tiles first (a budget may cut the sweep), then the float32 tricks
        g = int(fmt.split("_")[1][1:])
        return _int4_asm_candidates(m, g) + [c for c in _float_candidates(fmt, m)
                                             if c.kernel == "xla" or c.block_k % g == 0]
    return _float_candidates(fmt, m)


def _float_candidates(fmt: str, m: int) -> list[TileConfig]:
    int4 = fmt.startswith("int4")
    pf = dict(prefetch=True)
    if m == 1 and fmt != "w8a8":
        if int4:
            g = int(fmt.split("_")[1][1:])
            return [T("gemv", 1, 128, g, 8, 4, 3, **pf), T("gemv", 1, 128, g, 8, 4, 3), T("gemv", 1, 64, g, 16, 4, 3, **pf),
                    T("gemv", 1, 256, g, 8, 8, 3, **pf), T("gemv", 1, 128, g, 16, 4, 3, **pf), XLA]
        return [T("gemv", 1, 128, 64, 8, 4, 3, **pf), T("gemv", 1, 128, 32, 16, 4, 3, **pf),
                T("gemv", 1, 128, 64, 8, 4, 3), T("gemv", 1, 128, 32, 16, 4, 3), T("gemv", 1, 256, 64, 8, 8, 3, **pf),
                T("gemv", 1, 128, 64, 16, 4, 3, **pf), XLA]
    if m <= 32:
        bm = 16 if m <= 16 else 32
        return [T("dot", bm, 128, 128, 4, 4, 4), T("dot", bm, 64, 128, 8, 4, 4), T("dot", bm, 256, 64, 4, 8, 3),
                T("dot", bm, 128, 64, 8, 4, 4), T("dot", bm, 128, 128, 8, 4, 4), T("dot", bm, 128, 128, 8, 8, 3),
                T("dot", bm, 256, 128, 4, 8, 3), T("dot", bm, 128, 128, 4, 4, 5), XLA]
    if m <= 128:
        return [T("dot", 64, 128, 128, 2, 4, 4), T("dot", 128, 128, 64, 1, 8, 3), T("dot", 64, 128, 64, 4, 4, 4), XLA]
    large = [T("dot", 128, 128, 64, 1, 8, 3), T("dot", 128, 256, 64, 1, 8, 3), T("dot", 128, 128, 128, 1, 8, 3),
             T("dot", 64, 128, 64, 1, 4, 4), XLA]
    if fmt == "w8a8":  # int8 tensor cores: a narrow N (o, down: 4096) leaves one wave of 128 programs; split K
        large[-1:-1] = [T("dot", *tile) for tile in (
            (128, 128, 128, 2, 8, 3), (128, 128, 128, 4, 8, 3), (128, 256, 128, 2, 8, 3), (64, 128, 128, 2, 4, 4),
            (128, 128, 128, 2, 8, 4), (128, 128, 64, 2, 8, 4), (64, 256, 128, 2, 8, 3), (256, 128, 64, 2, 8, 3),
            (128, 128, 128, 3, 8, 3), (128, 256, 64, 2, 8, 4))]
    return large


def sweep_order(current: TileConfig | None, cands: list[TileConfig]) -> list[TileConfig]:
    """The candidates with the table's current choice for the problem first (once)."""
    return list(cands) if current is None else [current] + [c for c in cands if c != current]


def problem_budget(budget_s: float, elapsed_s: float, problems_left: int) -> float:
    """Seconds the next problem may use: an even share of what is left (at least 0)."""
    return max(budget_s - elapsed_s, 0.0) / max(problems_left, 1)


def entries_from_bench(path: str, table: list[dict], margin: float = 0.9) -> list[dict]:
    """Entries for (format, M, shape) problems the sweep did not cover, from a bench_qmatmul JSON of the same
    device: the config the bench's dispatch used (re-derived by lookup on ``table``, the table it ran with),
    or XLA where XLA's dequantize-then-dot was faster by more than ``1 - margin``."""
    with open(path) as f:
        bench = json.load(f)
    dev = qmatmul_tiles.device_key(bench["device"])
    have = {(e["device"], e["format"], e["m"], e["k"], e["n"]) for e in table}
    rows = {(r["method"], r["format"], r["shape"], r["m"]): r for r in bench["rows"]}
    new = []
    for (method, fmt, shape, m), r in rows.items():
        x = rows.get(("xla", fmt, shape, m))
        if method != "ours" or x is None:
            continue
        name = random_weight(jax.random.key(0), fmt, 256, 128).name
        if (dev, name, m, r["k"], r["n"]) in have:
            continue
        cfg = qmatmul_tiles.lookup(dev, name, m, r["k"], r["n"], table=tuple(table))
        label = r.get("config") or ""
        if cfg.kernel in qmatmul_tiles.XLA_KERNELS:  # older benches labelled XLA paths with unused tile fields
            label = label.split(" ")[0]
        if label != config_label(cfg):  # the bench ran another config (older lookup rules): unmeasured
            continue
        best = (XLA, x["us"]) if x["us"] < margin * r["us"] else (cfg, r["us"])
        new.append(dict(device=dev, format=name, m=m, k=r["k"], n=r["n"], us=round(best[1], 2),
                        config=best[0].to_json(), source="bench"))
    return new


def entries_from_sweep(path: str, table: list[dict]) -> list[dict]:
    """Entries for the (format, M, shape) problems of a sweep file (the ``*_sweep.json`` a run writes beside its
    table) that ``table`` lacks: each problem's fastest timed config, marked with the file as its ``source``. For a
    run whose table was not kept; a problem the table already holds is left as it is."""
    with open(path) as f:
        sweep = json.load(f)
    dev = qmatmul_tiles.device_key(sweep["device"])
    have = {(e["device"], e["format"], e["m"], e["k"], e["n"]) for e in table}
    best = {}
    for r in sweep["rows"]:
        name = random_weight(jax.random.key(0), r["format"], 256, 128).name
        k, n = SHAPES[r["shape"]]
        key = (dev, name, r["m"], k, n)
        if key not in have and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    return [dict(device=dev, format=name, m=m, k=k, n=n, us=round(r["us"], 2), config=r["config"],
                 source=f"{path} (the fastest timed config of a {sweep.get('date', '')} sweep)")
            for (dev, name, m, k, n), r in best.items()]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=qmatmul_tiles.TABLE_PATH)
    ap.add_argument("--formats", default="int8,int4_g128_sym,w8a8",
                    help="comma-separated: int8, int8_kmajor (K-major [N, K]), int4_g128_sym, "
                         "int4_g128_asym, int4_g64_sym, int4_g64_asym (each with _kmajor: K-major [N, K/2]), w8a8")
    ap.add_argument("--ms", default="1,512,32,128")
    ap.add_argument("--shapes", default="gate_up,down", help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--min_call_mb", type=int, default=512,
                    help="more layers for small shapes: at least this many MB of int8 weights per timed call")
    ap.add_argument("--budget_s", type=float, default=150.0)
    ap.add_argument("--timing", choices=("trace", "wall"), default="trace",
                    help="bench_qmatmul's: a call's GPU span in a profiler trace, or pipelined wall time")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every candidate of a problem this many times, round after round; keep the best median")
    ap.add_argument("--wide", action="store_true",
                    help="also sweep _wide_int8_candidates ([K, N] int8 at M <= 32: deeper pipelines, more programs)")
    ap.add_argument("--from_bench", default=None,
                    help="add entries for the problems of this bench JSON that the table lacks, then exit")
    ap.add_argument("--from_sweep", default=None,
                    help="add entries for the problems of this *_sweep.json that the table lacks, then exit")
    args = ap.parse_args()
    if args.from_bench or args.from_sweep:
        table = list(qmatmul_tiles.load_table())
        source = args.from_bench or args.from_sweep
        new = (entries_from_bench if args.from_bench else entries_from_sweep)(source, table)
        with open(args.out, "w") as f:
            json.dump(dict(note="written by experiments/tune_qmatmul.py; lookup rules in "
                                "kernels_pallas/qmatmul_tiles.py", entries=table + new), f, indent=1)
        print(f"added {len(new)} entries from {source}")
        return
    start = time.time()
    dev = gpu_name()
    entries = []  # the new entries; the table's others are kept below
    log = []
    problems = [(m, fmt, shape) for m in map(int, args.ms.split(",")) for fmt in args.formats.split(",")
                for shape in args.shapes.split(",")]
    for done_count, (m, fmt, shape) in enumerate(problems):
        k, n = SHAPES[shape]
        layers = layers_for(k, n, args.layers, args.min_call_mb)  # small shapes: more layers a call
        keys = jax.random.split(jax.random.key(k * n + m), layers)
        ws = [random_weight(kk, fmt, k, n) for kk in keys]
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        best, cut, compiled = None, False, []
        ref = quantized_matmul_reference(x, ws[0], out_dtype=jnp.float32)  # what every candidate must give
        current = qmatmul_tiles.lookup(dev, ws[0].name, m, k, n)  # what runs now on this device
        deadline = time.time() + problem_budget(args.budget_s, time.time() - start, len(problems) - done_count)
        for cfg in sweep_order(current, candidates(fmt, m, args.wide)):
            if time.time() > deadline and compiled:
                cut = True  # the rest of the list is not timed: the entry is the best of the timed part
                break
            impl = "pallas_gpu"  # an XLA kind of config routes to its XLA path
            fn = lambda x, w, cfg=cfg, impl=impl: quantized_matmul(x, w, config=cfg, impl=impl)
            try:
                err = check_against_reference(x, ws[0], cfg, ref)
                if not err < CHECK_TOL:
                    print(f"WRONG {fmt} {shape} M={m} {cfg}: relative error {err:.2e}", flush=True)
                    continue
                cs, measure = layer_timer(fn, x, ws, min_sample_s=0.01, samples=5, timing=args.timing)
                times = [measure()]
            except Exception as e:
                print(f"FAILED {fmt} {shape} M={m} {cfg}: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            compiled.append((cfg, cs, measure, times))
        for _ in range(args.rounds - 1):  # --rounds: every candidate again, round after round
            for _, _, measure, times in compiled:
                times.append(measure())
        for cfg, cs, _, times in compiled:
            s = statistics.median(times)  # one fastest sample of a ~10 us op is often noise
            log.append(dict(format=fmt, shape=shape, m=m, config=cfg.to_json(), us=s * 1e6, compile_s=cs,
                            **({"us_rounds": [t * 1e6 for t in times]} if len(times) > 1 else {})))
            print(f"{fmt:15s} {shape:8s} M={m:<4d} {s * 1e6:8.1f}us compile {cs:5.1f}s {cfg}", flush=True)
            if best is None or s < best[0]:
                best = (s, cfg)
        del compiled
        if best is not None:
            name = ws[0].name
            entries.append(dict(device=dev, format=name, m=m, k=k, n=n, us=round(best[0] * 1e6, 2),
                                config=best[1].to_json(), **({"partial": True} if cut else {})))
        del ws
    # Replace only the (device, format, M, K, N) problems tuned now: a sweep of some M buckets keeps the others.
    key = lambda e: (e["device"], e["format"], e["m"], e["k"], e["n"])
    done = {key(e) for e in entries}
    entries = [e for e in qmatmul_tiles.load_table() if key(e) not in done] + entries
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(note="written by experiments/tune_qmatmul.py; lookup rules in kernels_pallas/qmatmul_tiles.py",
                       entries=entries), f, indent=1)
    with open(os.path.splitext(args.out)[0] + "_sweep.json", "w") as f:
        json.dump(dict(device=jax.devices()[0].device_kind, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       versions=bench_common.versions(), rows=log), f, indent=1)
    print(f"wrote {len(entries)} entries to {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
