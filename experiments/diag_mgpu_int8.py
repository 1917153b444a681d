"""Can a Mosaic GPU (wgmma) int8 x bf16 kernel carry weight-only int8 on Hopper? (a diagnosis for issue 3)

jax ships ``jax.experimental.pallas.ops.gpu.hopper_mixed_type_matmul_mgpu.mixed_matmul_kernel(a, b)``:
``a`` int8 ``[m, k]`` is loaded from shared memory into registers, converted to bf16 and fed to ``wgmma`` as the
register (A) operand; ``b`` bf16 ``[k, n]`` stays in shared memory; warp-specialized TMA pipeline, persistent
grid. A K-major ``Int8Weight`` (``qweight[N, K]``) is exactly such an ``a``, so with ``b = x.T`` (tokens padded
to the tile) the kernel computes ``y.T`` before the per-channel scale:
``y = (mixed_matmul_kernel(qweight, x.T) * scale[:, None]).T``. Weight rows play the MMA's M (64 rows a
warpgroup), tokens its N (8 or more), the "swap AB" arrangement of small-batch mixed-type kernels.

This times it on GLM-4-9B's four shapes at M in {1, 8, 32, 128, 512} over a few tile configs, beside XLA's bf16
dot and this project's current int8 path on the same K-major weights, each as 8 distinct layers unrolled in one
jit (``bench_qmatmul.time_layers``); every config's output is first checked against the float32 dot of the
dequantized weight on fresh random inputs.

    python experiments/diag_mgpu_int8.py --out $OUT     # Hopper GPU only
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import bench_common  # noqa: E402
from bench_qmatmul import random_weight  # noqa: E402
from diag_int8_dot import time_variant, write_diag  # noqa: E402
from kernels_pallas import quantized_matmul  # noqa: E402

SMEM_BYTES = 227 * 1024  # the H100's shared memory per block
SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}


def mgpu_configs(m: int, k: int):
    """A small sweep: token tile (MMA N) from M, weight-row tile (MMA M), K step, pipeline depth, which dimension
    the two compute warpgroups split."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm
    tile_ns = [8, 16] if m <= 8 else [16, 32] if m <= 32 else [64, 128] if m <= 128 else [128]
    fields = {f.name for f in dataclasses.fields(mm.TuningConfig)}
    for tile_n, tile_m, tile_k, wg in itertools.product(
            tile_ns, (64, 128), (64, 128) if m >= 128 else (128, 256), (mm.MatmulDimension.M, mm.MatmulDimension.N)):
        if k % tile_k or (wg == mm.MatmulDimension.N and tile_n < 64):
            continue
        two = 2 if wg == mm.MatmulDimension.M else 1
        stage = tile_m * two * tile_k + tile_k * tile_n * (3 - two) * 2  # int8 a tile + bf16 b tile
        steps = min(4, (SMEM_BYTES - 2 * 2 * 64 * min(64, tile_n) * 4) // stage)  # f32 epilogue slots
        if steps < 2:
            continue
        kw = dict(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps,
                  epi_tile_n=min(64, tile_n), epi_tile_m=64, wg_dimension=wg)
        yield mm.TuningConfig(**{a: b for a, b in kw.items() if a in fields})


def label(cfg) -> str:
    return (f"mgpu tm{cfg.tile_m} tn{cfg.tile_n} tk{cfg.tile_k} st{cfg.max_concurrent_steps} "
            f"wg{cfg.wg_dimension}")


def mgpu_int8(x, w, cfg):
    """y[M, N] = x[M, K] @ dequant(w) for a K-major Int8Weight through the mixed-type wgmma kernel."""
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mm
    m = x.shape[0]
    cta_n = cfg.tile_n * (2 if cfg.wg_dimension == mm.MatmulDimension.N else 1)
    mp = -(-m // cta_n) * cta_n
    xt = jnp.pad(x, ((0, mp - m), (0, 0))).T  # [K, Mp]
    out = mm.mixed_matmul_kernel(w.qweight, xt, out_dtype=jnp.float32, config=cfg)  # [N, Mp]
    return (out[:, :m] * w.scale[:, None]).T.astype(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budget_s", type=float, default=400)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    t_start = time.perf_counter()
    bw = bench_common.measure_copy_bandwidth()
    rows = []
    for name in args.shapes:
        k, n = SHAPES[name]
        keys = jax.random.split(jax.random.key(0), args.layers)
        ws = [random_weight(kk, "int8_kmajor", k, n) for kk in keys]
        wb = [w.dequantize(jnp.float32).astype(jnp.bfloat16) for w in ws]
        for m in args.ms:
            x = jax.random.normal(jax.random.key(2 + m), (m, k), jnp.float32).astype(jnp.bfloat16)
            ref = jnp.dot(x.astype(jnp.float32), ws[0].dequantize(jnp.float32), precision=lax.Precision.HIGHEST)
            err = lambda y: float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            timed = [("bf16", lambda x, w: jnp.dot(x, w), wb, 2 * k * n, err(jnp.dot(x, wb[0]))),
                     ("ours_kmajor", lambda x, w: quantized_matmul(x, w), ws, k * n,
                      err(quantized_matmul(x, ws[0])))]
            for cfg in mgpu_configs(m, k):
                if time.perf_counter() - t_start > args.budget_s:
                    break
                fn = lambda x, w, cfg=cfg: mgpu_int8(x, w, cfg)
                try:
                    e = err(jax.jit(fn)(x, ws[0]))
                    problem = None if e < 1e-2 else f"rel err {e:.3g}"  # wrong results are recorded, never timed
                except Exception as ex:  # noqa: BLE001 -- recorded, the others go on
                    problem = bench_common.error_text(ex)[:300]
                if problem:
                    rows.append({"shape": name, "m": m, "variant": label(cfg), "error": problem})
                    print(json.dumps(rows[-1]), flush=True)
                else:
                    timed.append((label(cfg), fn, ws, k * n, e))
            for lab, fn, w_list, nbytes, e in timed:
                time_variant(rows, name, m, lab, fn, x, w_list, nbytes, e, bw)
    write_diag(rows, bw, args.out, "diag_mgpu_int8")
    best = {}
    for r in rows:
        if r.get("variant", "").startswith("mgpu") and "us" in r:
            key = (r["shape"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for (s, m), r in sorted(best.items()):
        print(f"best {s} M={m}: {r['variant']} {r['us']:.1f} us frac_bw {r['frac_bw']:.2f} "
              f"x bf16 {r.get('speedup_vs_bf16', 0):.2f}")


if __name__ == "__main__":
    main()
