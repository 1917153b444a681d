"""Block sizes of the Mosaic GPU (Hopper) ragged prefill kernel against the Triton kernel, in one run.

Each configuration (query block, key block, stages) is first checked against ``ragged_paged_attention_reference``
on fresh random pages (three sequences: a chunk after a long cached prefix, one starting mid-page, a one-token
chunk); a configuration that fails the check, or fails to compile, is recorded and not timed. Then each is timed
as in ``bench_paged_attention.py`` (4 sequences x 512-token chunks ending at context 512 and 4096, 4 layers in
one jit, a call's GPU span in a profiler trace), as a fraction of the bf16 matmul peak measured in the same run.

Writes <out>/prefill_mgpu_<gpu>.json/.md.  Usage: python experiments/tune_prefill_mgpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import error_text, gpu_tag, traced, write_results  # noqa: E402
from experiments.bench_paged_attention import (H, LAYERS, N, matmul_peak, prefill_call, prefill_case,  # noqa: E402
                                               random_pages)
from kernels_pallas.ragged_paged_attention import (ragged_paged_attention,  # noqa: E402
                                                   ragged_paged_attention_reference)

PAGE = 16
# (block_q, pages_per_block, num_stages): every one that fits a Hopper block's shared memory at page 16
CONFIGS = [(128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 2), (256, 4, 2)]


def check(rng, **blocks) -> float:
    """Relative error of one call against the reference on fresh random pages and queries."""
    contexts, chunks = [4096, 1000, 600], [512, 300, 1]
    kp, vp, table = random_pages(rng, contexts, PAGE, spare=7)
    starts = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int32)
    q = jnp.asarray(rng.standard_normal((int(starts[-1]) + 3, N, H)), jnp.bfloat16)
    args = (q, kp, vp, table, jnp.asarray(contexts, jnp.int32), jnp.asarray(starts),
            jnp.asarray([len(contexts)], jnp.int32))
    n = int(starts[-1])
    out = np.asarray(ragged_paged_attention(*args, **blocks), np.float32)[:n]
    ref = np.asarray(ragged_paged_attention_reference(*args), np.float32)[:n]
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def profile(rng, *, ctx, calls=10, **blocks) -> dict:
    """Per layer of one ``prefill_case`` call: GPU span, idle time inside it, and each kernel's time (a profiler
    trace of ``calls`` calls, ``diag_tensor_parallel.gpu_activity``)."""
    from experiments.diag_tensor_parallel import gpu_activity
    f, args, _ = prefill_call(rng, seqs=4, chunk=512, ctx=ctx, **blocks)
    with traced(f, *args, calls=calls, warmup=1) as xplane:
        (act,) = gpu_activity(xplane, steps=calls * LAYERS, top=8).values()
    return {"span_us": act["span_us_per_step"], "idle_us": act["idle_us_per_step"],
            "kernels": [(k["name"][:80], round(k["us_per_step"], 2), k["calls_per_step"]) for k in act["top_kernels"]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--configs", default="",
                    help="block_q:pages_per_block:num_stages,... (default: every one that fits at page 16)")
    ap.add_argument("--profile", action="store_true",
                    help="also trace triton and the best mosaic_gpu configuration: per-kernel times a layer")
    args = ap.parse_args()
    configs = ([tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")] if args.configs
               else CONFIGS)
    rng = np.random.default_rng(0)
    peak = matmul_peak(timing="trace")
    print(f"bf16 matmul peak {peak / 1e12:.0f} TFLOP/s", flush=True)
    runs = [("triton", {})] + [("mosaic_gpu", dict(block_q=bq, pages_per_block=ppb, num_stages=st))
                               for bq, ppb, st in configs]
    rows = []
    for backend, blocks in runs:
        row = dict(backend=backend, block_q=blocks.get("block_q"), block_kv=PAGE * blocks.get("pages_per_block", 0)
                   or None, stages=blocks.get("num_stages"))
        t = time.perf_counter()
        try:
            row["rel_err"] = check(rng, backend=backend, **blocks)
        except Exception as e:  # a configuration that does not compile is a result too
            row["error"] = error_text(e)
            print(backend, blocks, "FAILED:", row["error"][-400:], flush=True)
            rows.append(row)
            continue
        row["check_s"] = time.perf_counter() - t
        if not row["rel_err"] < 1e-2:
            print(backend, blocks, "WRONG: rel err", row["rel_err"], flush=True)
            rows.append(row)
            continue
        for ctx in (512, 4096):
            sec, flops = prefill_case(rng, seqs=4, chunk=512, ctx=ctx, timing="trace", backend=backend, **blocks)
            row[f"us_ctx{ctx}"] = sec * 1e6
            row[f"frac_peak_ctx{ctx}"] = flops / sec / peak
        print(row, flush=True)
        rows.append(row)
    timed = [r for r in rows if "frac_peak_ctx4096" in r]
    best = {b: max((r for r in timed if r["backend"] == b), key=lambda r: r["frac_peak_ctx4096"], default=None)
            for b in ("triton", "mosaic_gpu")}
    summary = {"matmul_peak_TFLOPs": peak / 1e12, "page_size": PAGE}
    for b, r in best.items():
        summary[f"prefill_frac_matmul_peak_chunk512_{b}"] = r and r["frac_peak_ctx4096"]
        summary[f"prefill_frac_matmul_peak_chunk512_first_chunk_{b}"] = r and r["frac_peak_ctx512"]
        summary[f"best_{b}"] = r and {k: r[k] for k in ("block_q", "block_kv", "stages")}
    if best["triton"] and best["mosaic_gpu"]:
        summary["mosaic_gpu_over_triton_ctx4096"] = (best["triton"]["us_ctx4096"] / best["mosaic_gpu"]["us_ctx4096"])
    profiles = {}
    if args.profile:
        for b, r in best.items():
            if r is None:
                continue
            blocks = {} if b == "triton" else dict(block_q=r["block_q"], pages_per_block=r["block_kv"] // PAGE,
                                                  num_stages=r["stages"])
            for ctx in (512, 4096):
                profiles[f"{b}_ctx{ctx}"] = profile(rng, ctx=ctx, backend=b, **blocks)
                print(b, ctx, profiles[f"{b}_ctx{ctx}"], flush=True)
    path = write_results(args.out, f"prefill_mgpu_{gpu_tag()}", rows=rows, summary=summary,
                         extra={"profiles": profiles},
                         columns=["backend", "block_q", "block_kv", "stages", "rel_err", "us_ctx512",
                                  "frac_peak_ctx512", "us_ctx4096", "frac_peak_ctx4096", "error"],
                         notes=__doc__.strip().splitlines()[0])
    print("SUMMARY", summary)
    print("wrote", path)


if __name__ == "__main__":
    main()
