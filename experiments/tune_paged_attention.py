"""Tile sweep for the paged attention kernels; writes kernels_pallas/tuned/paged_attention.json for this device.

Decode: per (batch, context, page size, dtype) point, a coordinate search: (num_splits x tokens per block
x row_gather; int8 pages: row gather x int8_qk) at 4 warps / 3 stages, then (num_warps x num_stages) around the
best (2-8 warps, 1-4 stages, twice the keys a block at 1-2 stages). Prefill: (block_q x tokens per block x
row_gather), then warps/stages. Timed with the benchmark's harness
(distinct layers unrolled, L2 rotated; ``--timing trace``, the default: a call's GPU span in a profiler trace).

Usage: python experiments/tune_paged_attention.py [--quick | --summary-points | --points B:CTX:L:Q ...]
       [--ops decode prefill] [--out DIR]
(--quick: fewer points, no write; a run replaces only the table entries it tuned)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import jax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments import bench_paged_attention as bench  # noqa: E402
from kernels_pallas import paged_attention as pa  # noqa: E402

bench.TARGET_S = 0.1

SMS = 132


def time_decode(rng, batch, ctx, page_size, quantized, cands, timing="trace"):
    layers, q, lengths, rot = bench.make_decode_inputs(rng, batch, ctx, page_size, quantized)
    res = []
    for c in cands:
        try:
            t = bench.run_layers(bench.ours(**c), layers, q, lengths, rot, timing)
        except Exception as e:  # noqa: BLE001 - an illegal tile is skipped
            print(f"  skip {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        res.append((t, c))
        print(f"  b{batch} ctx{ctx} L{page_size} {'int8' if quantized else 'bf16'} {c} {t * 1e6:.1f} us "
              f"({bench.kv_bytes(batch, ctx, quantized) / t / 1e12:.2f} TB/s)", flush=True)
    return min(res, key=lambda r: r[0]) if res else None


def tune_decode(rng, batch, ctx, page_size, quantized, timing="trace"):
    max_pages = ctx // page_size
    splits = sorted({max(1, min(max_pages, round(f * SMS / (batch * bench.K)))) for f in (0.5, 1, 2, 4, 8)})
    ppbs = sorted({max(1, t // page_size) for t in (64, 128, 256)})
    # int8 pages: the row gather (it won every int8 point since session 9) x int8_qk
    flags = ([dict(row_gather=True, int8_qk=i) for i in (False, True)] if quantized
             else [dict(row_gather=g) for g in (False, True)])
    stage_a = [dict(num_splits=s, pages_per_block=p, num_warps=4, num_stages=3, prefetch_ids=True, **f)
               for s in splits for p in ppbs for f in flags]
    best = time_decode(rng, batch, ctx, page_size, quantized, stage_a, timing)
    if best is None:
        return None
    base = best[1]
    ppb2 = base["pages_per_block"] * 2  # fewer stages of more keys: less shared memory a program, more programs an SM
    stage_b = [dict(base, prefetch_ids=False), dict(base, num_warps=8), dict(base, num_warps=2),
               dict(base, num_stages=1), dict(base, num_stages=2), dict(base, num_stages=4),
               dict(base, num_stages=1, pages_per_block=ppb2), dict(base, num_stages=2, pages_per_block=ppb2)]
    b2 = time_decode(rng, batch, ctx, page_size, quantized, stage_b, timing)
    return min(best, b2, key=lambda r: r[0]) if b2 else best


def tune_prefill(rng, page_size=16, timing="trace"):
    def run(cands):
        res = []
        for c in cands:
            try:
                sec, flops = bench.prefill_case(rng, seqs=4, chunk=512, ctx=4096, page_size=page_size, timing=timing,
                                                **c)
            except Exception as e:  # noqa: BLE001
                print(f"  skip {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            res.append((sec, c))
            print(f"  prefill L{page_size} {c} {sec * 1e6:.1f} us {flops / sec / 1e12:.1f} TFLOP/s", flush=True)
        return min(res, key=lambda r: r[0]) if res else None
    best = run([dict(block_q=bq, pages_per_block=max(1, t // page_size), num_warps=8, num_stages=3, row_gather=g)
                for bq, t in ((8, 64), (8, 128), (8, 256), (16, 64), (16, 128), (4, 256)) for g in (False, True)])
    if best is None:
        return None
    b2 = run([dict(best[1], num_warps=w, num_stages=s) for w, s in ((4, 3), (4, 4), (8, 2), (8, 4))])
    return min(best, b2, key=lambda r: r[0]) if b2 else best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summary-points", action="store_true",
                    help="only the benchmark summary's decode points (other table entries are kept)")
    ap.add_argument("--points", nargs="+", default=None, metavar="B:CTX:L:Q",
                    help="only these decode points, e.g. 32:8192:16:1 (Q 1 = int8 pages)")
    ap.add_argument("--ops", nargs="+", choices=["decode", "prefill"], default=["decode", "prefill"],
                    help="which kernels to tune (the other's table entries are kept)")
    ap.add_argument("--timing", choices=("trace", "wall"), default="trace",
                    help="the benchmark's: a call's GPU span in a profiler trace, or pipelined wall time")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    if args.points:
        points = [(int(b), int(c), int(pg), bool(int(qz))) for b, c, pg, qz in (p.split(":") for p in args.points)]
    elif args.quick:
        points = [(32, 2048, 16, False), (1, 8192, 16, False)]
    elif args.summary_points:
        points = [(32, 2048, 16, False), (1, 8192, 16, False), (32, 8192, 16, True), (32, 2048, 64, False)]
    else:
        points = [(32, 2048, 16, False), (1, 8192, 16, False), (8, 32768, 16, False), (32, 8192, 16, True),
                  (32, 2048, 64, False), (128, 8192, 16, False)]
    kind = jax.devices()[0].device_kind
    decode, prefill = [], []

    def save():  # after every point, so a run cut short still leaves its results
        if args.quick:
            return
        path = pa._TUNED_PATH
        table = json.loads(path.read_text()) if path.exists() else {}
        for op, tuned in (("decode", decode), ("prefill", prefill)):  # replace only the points tuned here
            keys = [e["key"] for e in tuned]
            kept = [e for e in table.get(op, {}).get(kind, []) if e["key"] not in keys]
            table.setdefault(op, {})[kind] = kept + tuned
        table["_doc"] = ("Written by experiments/tune_paged_attention.py: per device kind, the best block sizes "
                         "found per (batch, context, page_size, quantized, group); lookup takes the nearest "
                         "batch/context.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True))
        if args.out:
            shutil.copy(path, Path(args.out) / "paged_attention_tuned.json")

    best = tune_prefill(rng, timing=args.timing) if "prefill" in args.ops else None
    if best:
        prefill.append(dict(key=dict(batch=1, context=2048, page_size=16, quantized=False, group=bench.N // bench.K),
                            blocks=best[1], us=best[0] * 1e6))
        print(f"BEST prefill: {best[1]} {best[0] * 1e6:.1f} us", flush=True)
        save()
    for batch, ctx, page_size, quantized in (points if "decode" in args.ops else []):
        best = tune_decode(rng, batch, ctx, page_size, quantized, args.timing)
        if best:
            decode.append(dict(key=dict(batch=batch, context=ctx, page_size=page_size, quantized=quantized,
                                        group=bench.N // bench.K), blocks=best[1], us=best[0] * 1e6))
            print(f"BEST decode b{batch} ctx{ctx} L{page_size} q{int(quantized)}: {best[1]} {best[0] * 1e6:.1f} us",
                  flush=True)
            save()


if __name__ == "__main__":
    main()
