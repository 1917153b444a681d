"""The integer-dot GEMV over a K-major int8 weight (``qmatmul_dp4a``, ``kernel="dp4a"``) against the dispatch.

Per layer over ``--layers`` distinct weights unrolled in one jit (GPU span in a profiler trace), each variant
checked against ``quantized_matmul_reference`` first (relative error < 5e-3):

* ``ours``: ``quantized_matmul`` as the table dispatches it today (the K-major FMA GEMV for qkv / o, the
  ``xla_split`` dot for gate_up and down);
* ``dp4a bnN bkB wW sS``: the integer-dot GEMV at that tile with its own digit-plane prep (``digit_planes_pallas``);
* ``dp4a ... given``: the same with the planes made outside the timed call (as ``add_rms_norm`` / ``swiglu_digits``
  write them in the decode step);
* XLA's bf16 dot, for ratios in the same run.

    python experiments/diag_int8_dp4a.py --out $OUT        # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_common  # noqa: E402
from experiments.bench_qmatmul import random_weight, weight_bytes  # noqa: E402
from experiments.diag_int8_split_rows import per_layer_us  # noqa: E402
from kernels_pallas.act_digits import ActDigits  # noqa: E402
from kernels_pallas.qmatmul_dp4a import INT8_GROUP, digit_planes_pallas  # noqa: E402
from kernels_pallas.qmatmul_tiles import TileConfig  # noqa: E402
from kernels_pallas.quantized_matmul import quantized_matmul, quantized_matmul_reference  # noqa: E402

SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}
TILES = {"qkv": [(4, 1024, 2, 1), (2, 2048, 4, 1)], "o": [(4, 1024, 2, 1), (2, 2048, 4, 1)],
         "gate_up": [(2, 4096, 4, 1), (4, 2048, 4, 1)], "down": [(2, 2048, 2, 1), (4, 2048, 4, 4)]}


def dp4a(bn, bk, w, s):
    return TileConfig(kernel="dp4a", block_m=1, block_n=bn, block_k=bk, split_k=s, num_warps=w, num_stages=1)


def planes(x):
    p, xg, step = digit_planes_pallas(x, INT8_GROUP)
    return ActDigits(step=step, digits=p, group_sums=xg, group=INT8_GROUP)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gate_up,down,qkv,o")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default="experiments/results/qmatmul_diag")
    args = p.parse_args(argv)
    bw = bench_common.measure_copy_bandwidth()
    rows = []
    for shape in args.shapes.split(","):
        k, n = SHAPES[shape]
        keys = jax.random.split(jax.random.PRNGKey(0), args.layers)
        wq = [random_weight(kk, "int8_kmajor", k, n) for kk in keys]
        wb = [random_weight(kk, "bf16", k, n) for kk in keys]
        x = jax.random.normal(jax.random.PRNGKey(1), (1, k), jnp.float32).astype(jnp.bfloat16)
        xs = bench_common.distinct_inputs(x, args.layers)
        ref = quantized_matmul_reference(xs[0], wq[0]).astype(jnp.float32)
        variants = [("ours", xs, lambda x, w: quantized_matmul(x, w))]
        for t in TILES[shape]:
            cfg, name = dp4a(*t), "dp4a bn{} bk{} w{} s{}".format(*t)
            variants.append((name, xs, lambda x, w, c=cfg: quantized_matmul(x, w, config=c)))
            variants.append((name + " given", [(x, planes(x)) for x in xs],
                             lambda xd, w, c=cfg: quantized_matmul(xd[0], w, config=c, x_digits=xd[1])))
        for name, ins, fn in variants:
            y = fn(ins[0], wq[0]).astype(jnp.float32)
            err = float(jnp.max(jnp.abs(y - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))
            if not np.isfinite(err) or err > 5e-3:
                print(f"WRONG {shape} {name}: relative error {err}", flush=True)
                rows.append(dict(shape=shape, variant=name, error=err))
                continue
            us = per_layer_us(fn, ins, wq)
            rows.append(dict(shape=shape, variant=name, us=round(us, 3),
                             frac_bw=round(weight_bytes(wq[0]) / (us * 1e-6) / bw, 4), rel_err=err))
            print(shape, name, f"{us:.2f} us", rows[-1]["frac_bw"], flush=True)
        us = per_layer_us(lambda x, w: jnp.dot(x, w), xs, wb)
        rows.append(dict(shape=shape, variant="bf16", us=round(us, 3),
                         frac_bw=round(weight_bytes(wb[0]) / (us * 1e-6) / bw, 4)))
        print(shape, "bf16", f"{us:.2f} us", flush=True)
    summary = {"copy_bw_tbs": round(bw / 1e12, 3)}
    for shape in args.shapes.split(","):
        t = {r["variant"]: r["us"] for r in rows if r["shape"] == shape and "us" in r}
        own = [v for v in t if v.startswith("dp4a") and not v.endswith("given")]
        if own and "ours" in t:
            best = min(own, key=t.get)
            summary[shape] = dict(ours_us=t["ours"], best_dp4a=best, best_dp4a_us=t[best],
                                  given_us=t.get(best + " given"), bf16_us=t.get("bf16"))
    bench_common.write_results(args.out, f"diag_int8_dp4a_{bench_common.gpu_tag()}", rows=rows, summary=summary,
                               columns=["shape", "variant", "us", "frac_bw", "rel_err", "error"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
