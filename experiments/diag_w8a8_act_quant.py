"""Where W8A8's time goes at large M: the per-token activation quantization against the int8 GEMM (issue 3).

At M = 512, W8A8 = quantize x (per-token dynamic int8) + the int8 x int8 GEMM. This times, on GLM-4-9B's down
(13696 -> 4096) and gate_up (4096 -> 27392), each layer with its own x (distinct layers unrolled in one jit,
``bench_qmatmul.time_layers``; ``--timing trace``: a call's GPU span in a profiler trace):

* ``quant_xla``: ``quant_formats.quantize_activations`` (XLA: a row reduction and an elementwise fusion);
* ``quant_kernel_bm<B>_bk<C>_w<W>``: ``kernels_pallas.quantize_rows`` (one pass over x) at B rows a program, K in
  chunks of C, W warps;
* ``gemm``: the Pallas W8A8 GEMM alone on pre-quantized x (the tuned table's tile);
* ``w8a8_xla_quant`` / ``w8a8_kernel_quant``: the two together, as ``quantized_matmul`` runs them;
* ``bf16``: XLA's bf16 dot of the same x.

Correctness first: the kernel's int8 x and scales against ``quantize_activations`` (at most one step apart, on
fewer than 1e-3 of the elements) on each shape's first x.

    python experiments/diag_w8a8_act_quant.py --out $OUT [--ms 512,128] [--rounds 3]     # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_common  # noqa: E402
from bench_qmatmul import random_weight, time_layers  # noqa: E402
from diag_int8_dot import write_diag  # noqa: E402
from kernels_pallas import qmatmul_tiles  # noqa: E402
from kernels_pallas.qmatmul_gpu import gpu_qmatmul  # noqa: E402
from kernels_pallas.quant_formats import quantize_activations  # noqa: E402
from kernels_pallas.quantize_rows import quantize_rows  # noqa: E402
from kernels_pallas.quantized_matmul import fit_config  # noqa: E402

SHAPES = {"down": (13696, 4096), "gate_up": (4096, 27392)}
KERNEL_TILES = [(1, 16384, 8), (1, 16384, 4), (1, 16384, 16), (1, 16384, 2), (1, 8192, 4), (1, 8192, 8),
                (2, 16384, 8), (2, 16384, 16)]
# (block_m, block_k, num_warps); block_k 16384 is one chunk for every K here (session 22's first sweep,
# qmatmul_diag/s22_act_prep/: chunks of 1024-4096 were slower than one chunk of the padded row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", default="512")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timing", choices=("trace", "wall"), default="trace")
    args = ap.parse_args()
    bw = bench_common.measure_copy_bandwidth()
    dev = qmatmul_tiles.device_key(jax.devices()[0].device_kind)
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        ws = [random_weight(kk, "w8a8", k, n) for kk in jax.random.split(jax.random.key(0), args.layers)]
        wb = [w.dequantize(jnp.bfloat16) for w in ws]
        for m in map(int, args.ms.split(",")):
            xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.float32).astype(jnp.bfloat16)
                  for i in range(args.layers)]
            cfg = fit_config(qmatmul_tiles.lookup(dev, ws[0].name, m, k, n), ws[0], m)
            if cfg.kernel not in ("dot", "mgpu"):
                print(f"{name} M={m}: the table serves W8A8 by {cfg.kernel}; timing the GEMM at a default dot tile")
                cfg = fit_config(qmatmul_tiles.TileConfig(kernel="dot", block_m=128, block_n=128, block_k=128,
                                                          num_warps=8, num_stages=3), ws[0], m)

            def gemm(xq, sx, w, cfg=cfg):
                if cfg.kernel == "mgpu":  # the Mosaic GPU kernel, as quantized_matmul runs it on Hopper
                    from kernels_pallas.qmatmul_w8a8_mgpu import fit_stages, tiles_of, w8a8_matmul_mgpu
                    return w8a8_matmul_mgpu(xq, sx[:, 0], w.qweight, w.scale.astype(jnp.float32),
                                            tiles=fit_stages(tiles_of(cfg), jnp.bfloat16), out_dtype=jnp.bfloat16)
                y = gpu_qmatmul(xq, sx, w, cfg=cfg, out_dtype=jnp.bfloat16)
                return y if cfg.split_k == 1 else jnp.sum(y, axis=0).astype(jnp.bfloat16)

            rq, rs = quantize_activations(xs[0])
            variants = [("bf16", lambda _, wx: jnp.dot(wx[1], wx[0]), list(zip(wb, xs))),
                        ("quant_xla", lambda _, x: quantize_activations(x), xs)]
            for bm, bk, wp in KERNEL_TILES:
                q, s = quantize_rows(xs[0], block_m=bm, block_k=bk, num_warps=wp)
                d = np.abs(np.asarray(q, np.int32) - np.asarray(rq, np.int32))
                ok = d.max() <= 1 and (d > 0).mean() < 1e-3 and np.allclose(np.asarray(s), np.asarray(rs), rtol=1e-6)
                rows.append({"shape": name, "m": m, "variant": f"check_bm{bm}_bk{bk}_w{wp}", "max_step_diff": int(d.max()),
                             "frac_diff": float((d > 0).mean()), "ok": bool(ok)})
                print(json.dumps(rows[-1]), flush=True)
                if ok:
                    variants.append((f"quant_kernel_bm{bm}_bk{bk}_w{wp}",
                                     lambda _, x, bm=bm, bk=bk, wp=wp: quantize_rows(x, block_m=bm, block_k=bk,
                                                                                     num_warps=wp), xs))
            pre = [quantize_activations(x) for x in xs]
            variants += [
                ("gemm", lambda _, wq: gemm(wq[1][0], wq[1][1], wq[0]), list(zip(ws, pre))),
                ("w8a8_xla_quant", lambda _, wx: gemm(*quantize_activations(wx[1]), wx[0]), list(zip(ws, xs))),
                ("w8a8_kernel_quant", lambda _, wx: gemm(*quantize_rows(wx[1]), wx[0]), list(zip(ws, xs)))]
            for rnd in range(args.rounds):
                for label, fn, items in variants:
                    t, _ = time_layers(fn, xs[0], items, timing=args.timing)
                    rows.append({"shape": name, "m": m, "variant": label, "round": rnd, "us": 1e6 * t,
                                 "config": str(cfg) if label.startswith(("gemm", "w8a8")) else None})
                    print(json.dumps(rows[-1]), flush=True)
            write_diag(rows, bw, args.out, "diag_w8a8_act_quant")


if __name__ == "__main__":
    main()
