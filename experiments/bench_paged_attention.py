"""Paged attention on the GPU: this project's kernels vs jax's bundled Pallas GPU paged_attention vs dense XLA.

GLM-4-9B heads (N=32, K=2, H=128), bf16 (and int8 pages), page sizes 16 and 64, batch x context grid.
Timing: 4 distinct layers (separate page pools) unrolled in one jit; each layer is called ``rot`` times
with disjoint page tables into its pool so at least ~200 MB of pages are touched per jit call and L2
(50 MB) cannot serve them; per-call time = the jit call's time / (4 * rot), where the call's time is
(``--timing trace``, the default) its GPU span in a profiler trace, first kernel start to last kernel end, or
(``--timing wall``) the median wall time of pipelined calls, which the host's launches bound at small batches.
Roofline: copy bandwidth (read + write) and bf16 matmul rate measured in the same run.

Writes <out>/paged_attention_<gpu>.json/.md.  Usage: python experiments/bench_paged_attention.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import gpu_span_per_call, gpu_tag, measure_copy_bandwidth, write_results  # noqa: E402
from kernels_pallas.kv_pages import quantize_kv  # noqa: E402
from kernels_pallas.paged_attention import paged_attention  # noqa: E402
from kernels_pallas.ragged_paged_attention import on_hopper, ragged_paged_attention  # noqa: E402

N, K, H = 32, 2, 128
LAYERS = 4
TOUCH_BYTES = 200e6
TARGET_S = 0.25  # timed seconds per measurement


def call_seconds(fn, *args, target_s=None, samples=7, timing="wall") -> float:
    """Median seconds per call of a jitted fn: timing "wall", calls pipelined, blocking once per sample; "trace",
    a call's GPU span in a profiler trace (``bench_common.gpu_span_per_call``: its kernels, no host dispatch)."""
    if timing == "trace":
        return gpu_span_per_call(fn, *args)
    target_s = target_s or TARGET_S
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    est = max(time.perf_counter() - t, 1e-6)
    n = max(1, min(200, int(target_s / samples / est)))
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        out = None
        for _ in range(n):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def kv_bytes(batch, ctx, quantized=False) -> float:
    per_token = K * H * (1 if quantized else 2) * 2 + (K * 4 * 2 if quantized else 0)
    return batch * ctx * per_token


def random_pages(rng, lengths, page_size, spare=5):
    """Fresh random bf16 K / V pools [K, P, L, H] (every slot finite) and a shuffled page table [B, max pages]
    holding sequences of the given lengths: the correctness check the tune scripts run before timing."""
    pages = [-(-n // page_size) for n in lengths]
    num_pages = sum(pages) + spare
    kp = jnp.asarray(rng.standard_normal((K, num_pages, page_size, H)), jnp.bfloat16)
    vp = jnp.asarray(rng.standard_normal((K, num_pages, page_size, H)), jnp.bfloat16)
    perm = rng.permutation(num_pages)
    table = np.zeros((len(lengths), max(pages)), np.int32)
    at = 0
    for b, p in enumerate(pages):
        table[b, :p] = perm[at:at + p]
        at += p
    return kp, vp, jnp.asarray(table)


def make_decode_inputs(rng, batch, ctx, page_size, quantized=False):
    """LAYERS pools, each holding `rot` disjoint sets of B sequences of length ctx (shuffled pages)."""
    pages_per_seq = ctx // page_size
    rot = int(min(32, max(1, math.ceil(TOUCH_BYTES / (LAYERS * kv_bytes(batch, ctx, quantized))))))
    num_pages = rot * batch * pages_per_seq + 1
    layers = []
    for layer in range(LAYERS):
        key = jax.random.key(layer)
        shape = (K, num_pages, page_size, H)
        kp = jax.random.normal(key, shape, jnp.bfloat16)
        vp = jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16)
        ks = vs = None
        if quantized:
            kp, ks = quantize_kv(kp)
            vp, vs = quantize_kv(vp)
        perm = rng.permutation(num_pages - 1)[: rot * batch * pages_per_seq] + 1
        tables = [jnp.asarray(t.astype(np.int32)) for t in perm.reshape(rot, batch, pages_per_seq)]
        layers.append((kp, vp, ks, vs, tables))
    q = [[jax.random.normal(jax.random.key(1000 * layer + r), (batch, N, H), jnp.bfloat16) for r in range(rot)]
         for layer in range(LAYERS)]
    lengths = jnp.full((batch,), ctx, jnp.int32)
    return layers, q, lengths, rot


def run_layers(call, layers, q, lengths, rot, timing="wall"):
    """jit over all layers x rotations, each with its own pool / page table; returns every output (the timed
    program holds only the attention calls: no slicing or accumulating kernels between them)."""
    @jax.jit
    def f(layers, q, lengths):
        return [call(q[layer][r], kp, vp, lengths, tables[r], ks, vs)
                for layer, (kp, vp, ks, vs, tables) in enumerate(layers) for r in range(rot)]
    return call_seconds(f, layers, q, lengths, timing=timing) / (LAYERS * rot)


def ours(**blocks):
    return lambda q, kp, vp, lengths, table, ks, vs: paged_attention(q, kp, vp, lengths, table, k_scales=ks,
                                                                     v_scales=vs, **blocks)


def jax_bundled(**opts):
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    return lambda q, kp, vp, lengths, table, ks, vs: jpa.paged_attention(q, kp, vp, table, lengths, **opts)


def jax_options(pages_per_seq):
    out = []
    for ppcb, splits in ((8, 16), (8, 8), (4, 16), (16, 4)):
        if pages_per_seq % splits == 0 and (pages_per_seq // splits) % min(ppcb, pages_per_seq // splits) == 0:
            out.append(dict(pages_per_compute_block=ppcb, k_splits=splits))
    return out[:2] or [dict(pages_per_compute_block=1, k_splits=1)]


def dense_time(batch, ctx, timing="wall"):
    """Dense XLA GQA decode attention over [B, K, S, H] caches (``DenseKVCache``'s layout; over [B, S, K, H] XLA
    transposes each cache before both products), LAYERS distinct layers unrolled."""
    rot = int(min(32, max(1, math.ceil(TOUCH_BYTES / (LAYERS * kv_bytes(batch, ctx))))))
    ks = [[jax.random.normal(jax.random.key(100 * i + r), (batch, K, ctx, H), jnp.bfloat16) for r in range(rot)]
          for i in range(LAYERS)]
    vs = [[jax.random.normal(jax.random.key(100 * i + r + 50), (batch, K, ctx, H), jnp.bfloat16) for r in range(rot)]
          for i in range(LAYERS)]
    q = [[jax.random.normal(jax.random.key(7 + 100 * i + r), (batch, N, H), jnp.bfloat16) for r in range(rot)]
         for i in range(LAYERS)]
    lengths = jnp.full((batch,), ctx, jnp.int32)

    @jax.jit
    def f(ks, vs, q, lengths):
        outs = []
        for layer in range(LAYERS):
            for r in range(rot):
                qg = q[layer][r].reshape(batch, K, N // K, H)
                logits = jnp.einsum("bkgh,bksh->bkgs", qg, ks[layer][r], preferred_element_type=jnp.float32)
                logits = jnp.where(jnp.arange(ctx)[None, None, None] < lengths[:, None, None, None],
                                   logits * H ** -0.5, -1e30)
                p = jax.nn.softmax(logits, axis=-1).astype(jnp.bfloat16)
                outs.append(jnp.einsum("bkgs,bksh->bkgh", p, vs[layer][r]).reshape(batch, N, H))
        return outs
    return call_seconds(f, ks, vs, q, lengths, timing=timing) / (LAYERS * rot)


def matmul_peak(timing="wall") -> float:
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * 8192 ** 3 / call_seconds(f, a, b, timing=timing)


def prefill_case(rng, *, seqs, chunk, ctx, page_size=16, timing="wall", **blocks):
    """`seqs` sequences each with a `chunk`-token chunk ending at position ctx; returns (seconds, flops)."""
    f, args, flops = prefill_call(rng, seqs=seqs, chunk=chunk, ctx=ctx, page_size=page_size, **blocks)
    return call_seconds(f, *args, timing=timing) / LAYERS, flops


def prefill_call(rng, *, seqs, chunk, ctx, page_size=16, **blocks):
    """The jitted call of ``prefill_case`` (LAYERS layers, each its own pool), its arguments, and one layer's
    flops."""
    pages_per_seq = ctx // page_size
    num_pages = seqs * pages_per_seq + 1
    layers = []
    for layer in range(LAYERS):
        key = jax.random.key(100 + layer)
        kp = jax.random.normal(key, (K, num_pages, page_size, H), jnp.bfloat16)
        vp = jax.random.normal(jax.random.fold_in(key, 1), (K, num_pages, page_size, H), jnp.bfloat16)
        table = (rng.permutation(num_pages - 1)[: seqs * pages_per_seq] + 1).reshape(seqs, pages_per_seq)
        layers.append((kp, vp, jnp.asarray(table.astype(np.int32))))
    q = [jax.random.normal(jax.random.key(5 + layer), (seqs * chunk, N, H), jnp.bfloat16) for layer in range(LAYERS)]
    ctx_lens = jnp.full((seqs,), ctx, jnp.int32)
    qs = jnp.arange(seqs + 1, dtype=jnp.int32) * chunk
    ns = jnp.array([seqs], jnp.int32)

    @jax.jit
    def f(layers, q):
        return [ragged_paged_attention(q[layer], kp, vp, table, ctx_lens, qs, ns, **blocks)
                for layer, (kp, vp, table) in enumerate(layers)]
    keys = sum(ctx - chunk + i + 1 for i in range(chunk))
    return f, (layers, q), 4 * N * H * keys * seqs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="summary points only (smoke run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--budget_s", type=float, default=1e9, help="skip the remaining grid after this many seconds")
    ap.add_argument("--prefill-backends", default="triton,mosaic_gpu",
                    help="comma-separated ragged prefill backends timed in this run (rows ours_prefill_<backend>): "
                         "triton, mosaic_gpu (Hopper only); the one the dispatch picks on this device gives the "
                         "summary's key, the others keys of their own")
    ap.add_argument("--prefill-only", action="store_true", help="skip the decode grid (prefill rows only)")
    ap.add_argument("--timing", choices=("trace", "wall"), default="trace",
                    help="trace: a call's GPU span in a profiler trace (kernels only); wall: pipelined calls' wall "
                         "time, host-bound where launching a call's kernels outlasts them (small batches)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    # tokamax (0.0.17) has ragged_paged_attention with a Mosaic TPU kernel only (its GPU path is a jnp reference),
    # so there is no tokamax GPU kernel to time beside ours; its quantized matmul is bench_qmatmul's baseline.
    tokamax_note = ("no tokamax baseline: tokamax's ragged_paged_attention has a Mosaic TPU kernel only (0.0.17), "
                    "no GPU kernel")
    bw_common = bw_pipelined = bw = measure_copy_bandwidth()  # pipelined bf16 pass (bench_common)
    peak = matmul_peak(args.timing)
    print(f"copy bandwidth {bw_common / 1e12:.3f} TB/s (bench_common) / {bw_pipelined / 1e12:.3f} TB/s (pipelined) "
          f"-> roofline {bw / 1e12:.3f}; bf16 matmul {peak / 1e12:.1f} TFLOP/s; {tokamax_note}", flush=True)
    rows = []

    def record(impl, batch, ctx, page_size, sec, quantized=False, **extra):
        byt = kv_bytes(batch, ctx, quantized)
        row = dict(impl=impl, batch=batch, ctx=ctx, page_size=page_size, dtype="int8" if quantized else "bf16",
                   us=sec * 1e6, floor_us=byt / bw * 1e6, frac_bw=byt / bw / sec, **extra)
        rows.append(row)
        print(f"{impl:12s} b{batch:<4d} ctx{ctx:<6d} L{page_size:<3d} {row['dtype']:4s} {row['us']:9.1f} us "
              f"{row['frac_bw']:.3f} of bw {extra or ''}", flush=True)

    if args.quick:
        grid = [(32, 2048), (8, 32768), (32, 8192), (1, 8192)]
        page_sizes = (16, 64)
    else:
        first = [(32, 2048), (8, 32768), (32, 8192), (1, 8192)]  # the summary points first
        grid = first + [(b, c) for b in (1, 8, 32, 128) for c in (512, 2048, 8192, 32768) if (b, c) not in first]
        page_sizes = (16, 64)
    if args.prefill_only:
        grid = []
    skipped = []
    for batch, ctx in grid:
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append((batch, ctx))
            continue
        for page_size in page_sizes:
            layers, q, lengths, rot = make_decode_inputs(rng, batch, ctx, page_size)
            try:
                record("ours", batch, ctx, page_size, run_layers(ours(), layers, q, lengths, rot, args.timing))
            except Exception as e:  # noqa: BLE001 - a failing config is reported, the run goes on
                print(f"ours failed b{batch} ctx{ctx} L{page_size}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if page_size == 16 or ((batch, ctx) in ((32, 2048), (32, 8192)) and not args.quick):
                best = None
                for opts in jax_options(ctx // page_size):
                    try:
                        t = run_layers(jax_bundled(**opts), layers, q, lengths, rot, args.timing)
                        best = min(best or (t, opts), (t, opts), key=lambda x: x[0])
                    except Exception as e:  # noqa: BLE001
                        print(f"jax failed {opts}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                if best:
                    record("jax_bundled", batch, ctx, page_size, best[0], opts=str(best[1]))
            del layers, q
            gc.collect()
        if batch * ctx <= 32 * 32768:
            try:
                record("dense_xla", batch, ctx, 0, dense_time(batch, ctx, args.timing))
            except Exception as e:  # noqa: BLE001
                print(f"dense failed b{batch} ctx{ctx}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            gc.collect()
    for page_size in () if args.prefill_only else page_sizes:
        layers, q, lengths, rot = make_decode_inputs(rng, 32, 8192, page_size, quantized=True)
        record("ours", 32, 8192, page_size, run_layers(ours(), layers, q, lengths, rot, args.timing),
               quantized=True)
        del layers, q
        gc.collect()

    prefill = []
    dispatch = "mosaic_gpu" if on_hopper() else "triton"  # what ragged_paged_attention runs here by default
    for backend in args.prefill_backends.split(","):
        if backend == "mosaic_gpu" and not on_hopper():
            continue
        impl = f"ours_prefill_{backend}"
        for ctx in (512, 4096):
            sec, flops = prefill_case(rng, seqs=4, chunk=512, ctx=ctx, timing=args.timing, backend=backend)
            prefill.append(dict(impl=impl, backend=backend, seqs=4, chunk=512, ctx=ctx, us=sec * 1e6,
                                tflops=flops / sec / 1e12, frac_matmul_peak=flops / sec / peak))
            print(f"{impl} chunk512 ctx{ctx}: {sec * 1e6:.1f} us {flops / sec / 1e12:.1f} TFLOP/s "
                  f"({flops / sec / peak:.3f} of matmul peak)", flush=True)

    def pick(impl, batch, ctx, dtype="bf16", page_size=None):
        c = [r for r in rows if r["impl"] == impl and r["batch"] == batch and r["ctx"] == ctx and r["dtype"] == dtype
             and (page_size is None or r["page_size"] == page_size)]
        return min(c, key=lambda r: r["us"]) if c else None

    summary = {"copy_bw_TBps": bw / 1e12, "copy_bw_common_TBps": bw_common / 1e12,
               "copy_bw_pipelined_TBps": bw_pipelined / 1e12, "matmul_peak_TFLOPs": peak / 1e12,
               "tokamax": tokamax_note, "timing": args.timing}
    for b, c in ((32, 2048), (8, 32768), (32, 8192), (1, 8192)):
        r = pick("ours", b, c)
        summary[f"frac_bw_b{b}_ctx{c}"] = r and r["frac_bw"]
        summary[f"page_size_b{b}_ctx{c}"] = r and r["page_size"]
    ours16, jax16 = pick("ours", 32, 2048, page_size=16), pick("jax_bundled", 32, 2048, page_size=16)
    summary["speedup_vs_jax_b32_ctx2048"] = ours16 and jax16 and jax16["us"] / ours16["us"]
    i8, bf = pick("ours", 32, 8192, "int8", 16), pick("ours", 32, 8192, "bf16", 16)
    summary["int8_speedup_b32_ctx8192"] = i8 and bf and bf["us"] / i8["us"]
    summary["prefill_backend"] = dispatch
    for r in prefill:  # the dispatch's kernel gives the floor's key; another backend its own
        key = "prefill_frac_matmul_peak_chunk512" + ("" if r["backend"] == dispatch else f"_{r['backend']}")
        summary[key + ("_first_chunk" if r["ctx"] == 512 else "")] = r["frac_matmul_peak"]
    floors = {"frac_bw_b32_ctx2048": 0.8, "frac_bw_b8_ctx32768": 0.8, "frac_bw_b32_ctx8192": 0.8,
              "frac_bw_b1_ctx8192": 0.5, "speedup_vs_jax_b32_ctx2048": 1.6, "int8_speedup_b32_ctx8192": 1.6,
              "prefill_frac_matmul_peak_chunk512": 0.4}
    summary["grid_skipped_for_time"] = str(skipped)
    summary["floors_hold"] = {k: bool(summary.get(k) is not None and summary[k] >= v) for k, v in floors.items()}
    name = f"paged_attention_{gpu_tag()}" + ("_quick" if args.quick else "")
    path = write_results(args.out, name, rows=rows + prefill, summary=summary,
                         columns=["impl", "batch", "ctx", "page_size", "dtype", "us", "floor_us", "frac_bw", "opts",
                                  "seqs", "chunk", "tflops", "frac_matmul_peak"],
                         notes=__doc__.strip().splitlines()[2] + f" Timing: {args.timing}. " + tokamax_note)
    print("SUMMARY", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
    print("wrote", path)


if __name__ == "__main__":
    main()
