"""Block sizes of the Mosaic GPU (Hopper) paged decode kernel against the Triton kernel, in one run.

Each configuration (pages a key block, stages, splits) is first checked against ``paged_attention_reference`` on
fresh random pages (every slot finite; lengths that end mid-page and a one-token sequence); one that fails the
check or does not compile is recorded and not timed. Then each is timed at issue 4's summary points as in
``bench_paged_attention.py`` (4 layers, each with its own pools, several disjoint page tables so ~200 MB of pages
are touched a call; a call's GPU span in a profiler trace), as a fraction of the copy bandwidth measured in the same
run, beside the dispatch's Triton kernel (tuned table).

Writes <out>/decode_mgpu_<gpu>.json/.md.  Usage: python experiments/tune_decode_mgpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import error_text, gpu_tag, measure_copy_bandwidth, write_results  # noqa: E402
from experiments.bench_paged_attention import (H, K, N, kv_bytes, make_decode_inputs, ours,  # noqa: E402
                                               random_pages, run_layers)
from kernels_pallas.paged_attention import paged_attention, paged_attention_reference  # noqa: E402
from kernels_pallas.paged_attention_mgpu import default_splits  # noqa: E402

POINTS = [(32, 2048), (8, 32768), (32, 8192), (1, 8192)]
# (keys a block, stages, splits factor: 1 = the kernel's default of about two programs an SM)
CONFIGS = [(64, 2, 1), (64, 3, 1), (64, 4, 1), (128, 2, 1), (64, 3, 2), (128, 2, 2)]


def check(rng, page_size, **blocks) -> float:
    lengths = [700, 1, 333, 64]
    kp, vp, table = random_pages(rng, lengths, page_size)
    q = jnp.asarray(rng.standard_normal((len(lengths), N, H)), jnp.bfloat16)
    args = (q, kp, vp, jnp.asarray(lengths, jnp.int32), table)
    out = np.asarray(paged_attention(*args, **blocks), np.float32)
    ref = np.asarray(paged_attention_reference(*args), np.float32)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)) if np.isfinite(out).all() else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--page-sizes", default="16,64")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    bw = measure_copy_bandwidth()
    rows = []
    for page_size in [int(p) for p in args.page_sizes.split(",")]:
        good = []
        for keys, stages, factor in CONFIGS:
            blocks = dict(backend="mosaic_gpu", pages_per_block=keys // page_size, num_stages=stages)
            row = dict(page_size=page_size, keys=keys, stages=stages, split_factor=factor)
            try:
                row["rel_err"] = check(rng, page_size, **blocks)
                if not row["rel_err"] < 1e-2:
                    raise AssertionError(f"wrong: relative error {row['rel_err']:.3g}")
                good.append((row, blocks))
            except Exception as e:  # a failed configuration is a result too
                row["error"] = error_text(e)
                rows.append(row)
                print(row, flush=True)
        for batch, ctx in POINTS:
            layers, q, lengths, rot = make_decode_inputs(rng, batch, ctx, page_size)
            byt = kv_bytes(batch, ctx)
            sec = run_layers(ours(), layers, q, lengths, rot, "trace")
            rows.append(dict(page_size=page_size, batch=batch, ctx=ctx, impl="triton", us=sec * 1e6,
                             frac_bw=byt / bw / sec))
            print(rows[-1], flush=True)
            for row, blocks in good:
                splits = None
                if row["split_factor"] != 1:
                    splits = default_splits(batch, K) * row["split_factor"]
                r = dict(row, batch=batch, ctx=ctx, impl="mosaic_gpu")
                try:
                    sec = run_layers(ours(num_splits=splits, **blocks), layers, q, lengths, rot, "trace")
                    r.update(us=sec * 1e6, frac_bw=byt / bw / sec)
                except Exception as e:
                    r["error"] = error_text(e)
                rows.append(r)
                print(r, flush=True)
            del layers, q
            gc.collect()
    summary = {"copy_bw_TBps": bw / 1e12}
    for batch, ctx in POINTS:
        for impl in ("triton", "mosaic_gpu"):
            c = [r for r in rows if r.get("impl") == impl and r.get("batch") == batch and r.get("ctx") == ctx
                 and "frac_bw" in r]
            best = max(c, key=lambda r: r["frac_bw"], default=None)
            summary[f"frac_bw_b{batch}_ctx{ctx}_{impl}"] = best and best["frac_bw"]
            if impl == "mosaic_gpu" and best:
                summary[f"best_b{batch}_ctx{ctx}_mosaic_gpu"] = {k: best[k] for k in ("page_size", "keys", "stages",
                                                                                     "split_factor")}
    path = write_results(args.out, f"decode_mgpu_{gpu_tag()}", rows=rows, summary=summary,
                         columns=["impl", "batch", "ctx", "page_size", "keys", "stages", "split_factor", "us",
                                  "frac_bw", "rel_err", "error"], notes=__doc__.strip().splitlines()[0])
    print("SUMMARY", summary)
    print("wrote", path)


if __name__ == "__main__":
    main()
