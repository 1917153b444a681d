"""Tile sweep for the fused dense decode attention (kernels_pallas/dense_decode_attention.py); GPU only.

For each batch size, GLM-4-9B heads (32 query, 2 KV, head_dim 128) over a ``--max-len``-slot cache with every row at
position ``--position``: time ``--layers`` distinct layers (own caches, donated and threaded through) unrolled in one
jit, for every (splits, block_s, num_warps, num_stages) candidate and for the XLA path (the reference: scatter writes,
batched GEMMs, softmax), and keep the fastest kernel config per batch in
``kernels_pallas/tuned/dense_decode_attention.json`` (entries of other devices and batches are kept).

    python experiments/tune_dense_decode_attention.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments import bench_common  # noqa: E402
from kernels_pallas import dense_decode_attention as dda  # noqa: E402

N, K, H = 32, 2, 128


def time_layers(fn, inputs, caches, pos, reps: int = 30) -> float:
    """Seconds per layer: ``fn(*inputs[i], ck, cv, pos)`` on each layer's own inputs and (donated) caches in one jit
    (one set of inputs shared by the layers would let XLA compute the reference's input-only work once)."""
    def step(inputs, caches, pos):
        outs, new = [], []
        for args, (ck, cv) in zip(inputs, caches):
            o, ck, cv = fn(*args, ck, cv, pos)
            outs.append(o)
            new.append((ck, cv))
        return sum(o.astype(jnp.float32) for o in outs), new

    f = jax.jit(step, donate_argnums=(1,))
    for _ in range(3):
        out, caches = f(inputs, caches, pos)
    jax.block_until_ready(out)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            out, caches = f(inputs, caches, pos)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / reps / len(caches))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--max-len", type=int, default=640)
    ap.add_argument("--position", type=int, default=576, help="every row's position (the mean of a 512 + 128 run)")
    # 4 layers a call timed the host's dispatch at batch 1 (13.5 us a layer for a 6.5 us kernel, session 10)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--out", default=str(dda.TUNED_PATH.parent))
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--block-s", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--rows", action="store_true", help="time the rows entry the model runs (qkv rows, RoPE in the "
                    "kernel) instead of the q / k / v one")
    args = ap.parse_args()
    dev = jax.devices()[0].device_kind
    bw = bench_common.measure_copy_bandwidth(2 << 30)
    rows, best = [], {}
    for b in args.batch:
        key = jax.random.key(b)
        kq, kk, kv, kc = jax.random.split(key, 4)
        qs, kns, vns = (bench_common.distinct_inputs(jax.random.normal(kx, shape, jnp.float32).astype(jnp.bfloat16),
                                                     args.layers, key=jax.random.fold_in(kx, 1))
                        for kx, shape in ((kq, (b, N, H)), (kk, (b, K, H)), (kv, (b, K, H))))
        pos = jnp.full((b,), args.position, jnp.int32)
        nbytes = 2 * b * K * (args.position + 1) * H * 2  # keys and values read (the cache as far as attended)
        cands = [dict(splits=s, block_s=bs, num_warps=w, num_stages=st)
                 for s, bs, w, st in itertools.product(args.splits, args.block_s, args.warps, args.stages)]
        paths = [("xla", None)] + [("kernel", c) for c in cands]
        def cache(j):  # [B, K, S, H], fresh per path: time_layers donates it
            return jax.random.normal(jax.random.fold_in(kc, j), (b, K, args.max_len, H)).astype(jnp.bfloat16)

        angle = jax.random.uniform(kc, (b, H), jnp.float32, 0, 6.3)
        cos, sin = jnp.cos(angle).astype(jnp.bfloat16), jnp.sin(angle).astype(jnp.bfloat16)
        if args.rows:  # each layer's qkv rows [B, N + 2K, H]
            inputs = [(jnp.concatenate(t, axis=1),) for t in zip(qs, kns, vns)]
        else:
            inputs = list(zip(qs, kns, vns))

        def entry(c):
            kw = dict(backend="reference") if c is None else c
            if args.rows:
                return lambda qkv, ck, cv, p: dda.dense_decode_attention_rows(qkv, ck, cv, p, cos, sin, **kw)
            return lambda *a: dda.dense_decode_attention(*a, **kw)

        for name, c in paths:
            caches = [(cache(2 * i), cache(2 * i + 1)) for i in range(args.layers)]
            fn = entry(c)
            try:
                t = time_layers(fn, inputs, caches, pos)
            except Exception as e:  # noqa: BLE001 - an illegal tile is reported and skipped
                print(f"skip b{b} {c}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            row = dict(batch=b, path=name, config=c, us=t * 1e6, frac_bw=nbytes / t / bw)
            rows.append(row)
            print(f"b{b} {name} {c} {t * 1e6:.1f} us ({row['frac_bw']:.2f} of copy bandwidth)", flush=True)
            if c is not None and (b not in best or t < best[b][0]):
                best[b] = (t, c)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = list(dda.load_table())
    table = [e for e in table if not (e["device"] == dev and e["batch"] in best)]
    table += [dict(device=dev, batch=b, max_len=args.max_len, us=round(t * 1e6, 2), blocks=c)
              for b, (t, c) in sorted(best.items())]
    (out / dda.TUNED_PATH.name).write_text(json.dumps(
        {"_doc": "Written by experiments/tune_dense_decode_attention.py: per device kind, the fastest block sizes "
                 "per batch; lookup takes the nearest batch.", "entries": table}, indent=1))
    (out / "dense_decode_attention_sweep.json").write_text(json.dumps(
        dict(device=dev, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=bench_common.versions(),
             copy_bw_tbs=bw / 1e12, max_len=args.max_len, position=args.position,
             entry="rows" if args.rows else "q/k/v", rows=rows), indent=1))
    for b, (t, c) in sorted(best.items()):
        x = next((r["us"] for r in rows if r["batch"] == b and r["path"] == "xla"), float("nan"))
        print(f"batch {b}: best {c} {t * 1e6:.1f} us; XLA path {x:.1f} us ({x / (t * 1e6):.2f}x)")


if __name__ == "__main__":
    main()
