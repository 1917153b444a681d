"""Tile sweep for the decode-site matmul kernels (kernels_pallas/splitk_matmul.py, glu_matmul.py); GPU only.

A "site" is what a decode step runs after the attention output or the MLP: the matmul, then the residual add and the
next RMSNorm. XLA's way: ``y = x @ w`` (its GEMM, with its split-K partials summed in a fusion of its own) and
``add_rms_norm(y, r)``; ours: ``splitk_matmul(x, w)`` and ``add_rms_norm(partials, r)``, which sums them. For each
(M, shape) it first checks the kernel against its reference (fresh random inputs, a NaN-poisoned output, both
paths' sites against each other), then times ``--layers`` distinct layers unrolled in one jit by GPU span (profiler
trace), and keeps the fastest config, or ``"xla"`` where XLA's site is faster, in
``kernels_pallas/tuned/splitk_matmul.json`` (entries of other devices and shapes are kept). The qkv shape is
timed as the bare matmul (its consumer is the attention kernel). The gate_up shape is the MLP's projection with
SwiGLU: XLA's dot + SwiGLU fusion against ``glu_matmul`` (SwiGLU in its epilogue), kept in
``kernels_pallas/tuned/glu_matmul.json``.

    python experiments/tune_splitk_matmul.py --out $OUT
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments import bench_common  # noqa: E402
from kernels_pallas import glu_matmul as glu  # noqa: E402
from kernels_pallas import splitk_matmul as skm  # noqa: E402
from kernels_pallas.add_rms_norm import add_rms_norm  # noqa: E402

SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "down": (13696, 4096), "gate_up": (4096, 27392)}  # GLM-4-9B (K, N)
EPS = 1.5625e-07
NORMS = [dict(block_r=1, num_warps=8), dict(block_r=2, num_warps=8), dict(block_r=1, num_warps=16),
         dict(block_r=1, num_warps=2)]


def candidates(k: int, n: int, warps, stages, shape: str = "") -> list[dict]:
    if shape == "gate_up":  # glu_matmul: no split, two weight tiles a step
        return [dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
                for bn, bk, w, st in itertools.product((64, 32, 128), (128, 64, 256), warps, stages)
                if (n // 2) % bn == 0 and k % bk == 0 and 2 * bn * bk * st <= 3 * 2**15]
    out = []
    for bn, bk, s, w, st in itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8), warps, stages):
        programs = n // bn * s
        if k % bk or n % bn or s > k // bk or not 64 <= programs <= 600 or bn * bk * st > 3 * 2**15:
            continue
        out.append(dict(block_n=bn, block_k=bk, split_k=s, num_warps=w, num_stages=st))
    # likeliest first (one program an SM, 128-row K steps; session 16 sweep), so a budget cut drops the outliers
    return sorted(out, key=lambda c: (abs(math.log2(n // c["block_n"] * c["split_k"] / 132)), c["block_k"] != 128))


def site_fn(cfg, with_norm: bool, norm=None, shape: str = ""):
    """(xs, ws, r, scale) -> per-layer outputs, every layer's weight and activation distinct, unrolled (with one x
    shared by the layers XLA may merge its dots into one: ``bench_common.distinct_inputs``); ``norm``:
    add_rms_norm's block sizes."""
    def run(xs, ws, r, scale):
        outs = []
        for x, w in zip(xs, ws):
            if shape == "gate_up":
                outs.append(glu.glu_matmul_reference(x, w) if cfg is None else glu.glu_matmul(x, w, **cfg))
                continue
            y = jnp.dot(x, w) if cfg is None else skm.splitk_matmul(x, w, **cfg)
            outs.append(add_rms_norm(y, r, scale, eps=EPS, **(norm or {}))[0] if with_norm else y)
        return outs
    return jax.jit(run)


def check(m, k, n, cfg, shape: str = "") -> float:
    """Max relative error of the kernel against its reference (poisoned output) and of our site against XLA's."""
    kx, kw, kr = jax.random.split(jax.random.key(m * 7 + k + n), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
    if shape == "gate_up":
        got = glu.glu_matmul(x, w, jnp.full((m, n // 2), jnp.nan, jnp.bfloat16), **cfg).astype(jnp.float32)
        want = glu.glu_matmul_reference(x, w).astype(jnp.float32)
        if not bool(jnp.all(jnp.isfinite(got))):
            raise AssertionError(f"non-finite output (poison left) at m={m} k={k} n={n} {cfg}")
        return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    poison = jnp.full((cfg["split_k"], m, n), jnp.nan, jnp.float32)
    got = skm.splitk_matmul(x, w, poison, **cfg)
    want = skm.splitk_matmul_reference(x, w, split_k=cfg["split_k"], block_k=cfg["block_k"])
    err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    r = jax.random.normal(kr, (m, n), jnp.float32).astype(jnp.bfloat16)
    scale = jnp.ones((n,), jnp.bfloat16)
    ours = add_rms_norm(got, r, scale, eps=EPS)[1].astype(jnp.float32)
    xla = add_rms_norm(jnp.dot(x, w), r, scale, eps=EPS)[1].astype(jnp.float32)
    if not bool(jnp.all(jnp.isfinite(got))):
        raise AssertionError(f"non-finite output (poison left) at m={m} k={k} n={n} {cfg}")
    return max(err, float(jnp.max(jnp.abs(ours - xla)) / jnp.max(jnp.abs(xla))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[32])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--warps", type=int, nargs="+", default=[4])
    ap.add_argument("--stages", type=int, nargs="+", default=[4])
    ap.add_argument("--min-mb", type=int, default=400, help="weights a timed call reads (distinct layers)")
    ap.add_argument("--budget_s", type=float, default=90.0, help="seconds of sweep per (M, shape)")
    ap.add_argument("--out", default=str(Path(skm.TABLE_PATH).parent))
    args = ap.parse_args()
    dev = jax.devices()[0].device_kind
    bw = bench_common.measure_copy_bandwidth(2 << 30)
    rows, best = [], {}
    for m, shape in itertools.product(args.ms, args.shapes):
        t_end = time.monotonic() + args.budget_s
        k, n = SHAPES[shape]
        layers = max(2, math.ceil(args.min_mb * 2**20 / (k * n * 2)))
        kx, kw, kr = jax.random.split(jax.random.key(m + k), 3)
        x = bench_common.distinct_inputs(jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16), layers)
        ws = [(jax.random.normal(jax.random.fold_in(kw, i), (k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
              for i in range(layers)]
        r = jax.random.normal(kr, (m, n), jnp.float32).astype(jnp.bfloat16)
        scale = jnp.ones((n,), jnp.bfloat16)
        with_norm = shape in ("o", "down")
        nbytes = k * n * 2
        for cfg in [None] + candidates(k, n, args.warps, args.stages, shape):
            if cfg is not None and time.monotonic() > t_end:
                print(f"budget spent: m={m} {shape} stops at {cfg}", flush=True)
                break
            try:
                err = 0.0 if cfg is None else check(m, k, n, cfg, shape)
                if err > 2e-2:
                    raise AssertionError(f"relative error {err:.3g}")
                t = bench_common.gpu_span_per_call(site_fn(cfg, with_norm, shape=shape), x, ws, r, scale) / layers
                tm = (t if not with_norm else
                      bench_common.gpu_span_per_call(site_fn(cfg, False), x, ws, r, scale) / layers)
            except Exception as e:  # noqa: BLE001 - an illegal tile is reported and skipped
                print(f"skip m={m} {shape} {cfg}: {bench_common.error_text(e)}", flush=True)
                continue
            row = dict(m=m, shape=shape, k=k, n=n, path="xla" if cfg is None else "kernel", config=cfg,
                       site_us=t * 1e6, matmul_us=tm * 1e6, matmul_frac_bw=nbytes / tm / bw, rel_err=err,
                       layers=layers)
            rows.append(row)
            print(f"m={m} {shape} {row['path']} {cfg} site {t * 1e6:.2f} us, matmul {tm * 1e6:.2f} us "
                  f"({row['matmul_frac_bw']:.3f} of copy bandwidth)", flush=True)
            key = (m, k, n)
            if key not in best or t < best[key][0]:
                best[key] = (t, cfg, shape)
        if with_norm:  # the norm's block sizes at the two fastest sites of each path
            for path in ("xla", "kernel"):
                top = sorted((r for r in rows if r["m"] == m and r["shape"] == shape and r["path"] == path
                              and "norm" not in r), key=lambda r: r["site_us"])[:2]
                for r0, norm in itertools.product(top, NORMS):
                    t = bench_common.gpu_span_per_call(site_fn(r0["config"], True, norm), x, ws, r, scale) / layers
                    rows.append(dict(r0, site_us=t * 1e6, norm=norm))
                    print(f"m={m} {shape} {path} {r0['config']} norm {norm} site {t * 1e6:.2f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, glu_table, what in ((skm.TABLE_PATH, False, "split-K config for a decode site (matmul + add_rms_norm)"),
                                  (glu.TABLE_PATH, True, "glu_matmul config (gate/up projection + SwiGLU)")):
        mine = {key: v for key, v in best.items() if (v[2] == "gate_up") == glu_table}
        if not mine:
            continue
        table = skm._table(path).get("entries", [])
        table = [e for e in table if not (e["device"] == dev and (e["m"], e["k"], e["n"]) in mine)]
        table += [dict(device=dev, m=m, k=k, n=n, shape=shape, us=round(t * 1e6, 2), config=c if c else "xla")
                  for (m, k, n), (t, c, shape) in sorted(mine.items())]
        (out / Path(path).name).write_text(json.dumps(
            {"_doc": f"Written by experiments/tune_splitk_matmul.py: per device kind and (M, K, N), the fastest "
                     f"{what}, or \"xla\" where XLA's path was faster.", "entries": table}, indent=1))
    summary = {}
    for (m, k, n), (t, c, shape) in sorted(best.items()):
        xla = next(r for r in rows if r["m"] == m and r["shape"] == shape and r["path"] == "xla")
        summary[f"{shape}_m{m}"] = dict(best=c or "xla", site_us=t * 1e6, xla_site_us=xla["site_us"],
                                        speedup=xla["site_us"] / (t * 1e6))
        print(f"m={m} {shape}: best {c or 'xla'} {t * 1e6:.2f} us; XLA {xla['site_us']:.2f} us "
              f"({xla['site_us'] / (t * 1e6):.3f}x)")
    (out / "splitk_matmul_sweep.json").write_text(json.dumps(
        dict(device=dev, date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), versions=bench_common.versions(),
             copy_bw_tbs=bw / 1e12, rows=rows, summary=summary), indent=1, default=str))


if __name__ == "__main__":
    main()
