"""The ``xla_split`` int8 path at one row, with its digit rows padded (issue 3's int8 M=1 floors).

At one row the split int8 dot multiplies two digit rows ``[2, K]`` by the int8 weight; the file of record timed
gate_up (K-major 4096 -> 27392) at 42.7 us at M=1 but 40.4 us at M=8 (``[16, K]`` digit rows, prep included), so
XLA's GEMM for two rows may be a worse choice than for sixteen. This times, per layer over ``--layers`` distinct
weights unrolled in one jit (GPU span in a profiler trace, ``bench_common.gpu_span_per_call``):

* ``ours``: ``quantized_matmul`` as dispatched (the prep, the dot, the epilogue);
* ``pad R``: the same prep, the digit rows zero-padded to R rows before the dot;
* ``given``, ``given pad R``: the digits made outside the timed call (as a producer kernel writes them), the dot
  on 2 rows or padded to R (whether XLA fuses the pad into the GEMM);
* ``xla x pad R``: x zero-padded to R rows, XLA's dequantize-then-dot (at M = 8 XLA writes a GEMM fusion that
  read gate_up at 0.96 of bandwidth, against 0.77 for its one-row form);
* ``k_blocks b``: a step per row and K block (``quantized_matmul(..., k_blocks=b)``), the dot batched;
* ``rows prep wW bkB``: the one-launch prep (``quantize_rows.split_rows``) with other warps / chunks;
* ``ours M=8``, XLA's bf16 dot and XLA's dequantize-then-dot int8, for ratios in the same run.

Every variant is checked against ``quantized_matmul_reference`` first.

    python experiments/diag_int8_split_rows.py --out $OUT        # GPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from experiments import bench_common  # noqa: E402
from experiments.bench_qmatmul import random_weight, weight_bytes  # noqa: E402
from kernels_pallas.act_digits import SPLIT_STEPS  # noqa: E402
from kernels_pallas.quantize_rows import split_rows  # noqa: E402
from kernels_pallas.quantized_matmul import quantized_matmul, quantized_matmul_reference  # noqa: E402

SHAPES = {"gate_up": (4096, 27392, "int8_kmajor"), "down": (13696, 4096, "int8"),
          "down_kmajor": (13696, 4096, "int8_kmajor"), "qkv": (4096, 4608, "int8_kmajor")}


def split_dot(step, digits, w, rows: int):
    """The split dot of one row's digits [2, K] (step [1, 1]) padded to ``rows`` rows -> y [1, N] bf16."""
    if rows > 2:
        digits = jnp.pad(digits, ((0, rows - 2), (0, 0)))
    kdim = 1 if w.k_major else 0
    acc = lax.dot_general(digits, w.qweight, (((1,), (kdim,)), ((), ())),
                          preferred_element_type=jnp.int32).astype(jnp.float32)
    return ((128.0 * acc[:1] + acc[1:2]) * step * w.scale).astype(jnp.bfloat16)


def prep(x):
    return split_rows(x, steps=SPLIT_STEPS)


def variants(pads):
    yield "ours", 1, lambda x, w: quantized_matmul(x, w)
    for r in pads:
        yield f"pad {r}", 1, lambda x, w, r=r: split_dot(*prep(x), w, r)
    yield "given", 1, None
    for r in pads:
        yield f"given pad {r}", 1, r
    for r in (8, 16):  # x padded to r rows, XLA's dequantize-then-dot (a GEMM fusion from M = 8 on)
        yield f"xla x pad {r}", 1, lambda x, w, r=r: quantized_matmul(jnp.pad(x, ((0, r - 1), (0, 0))), w,
                                                                        impl="xla")[:1]
    for b in (2, 4):  # a step per row and K block (XLA's prep), the dot batched over the blocks
        yield f"k_blocks {b}", 1, lambda x, w, b=b: quantized_matmul(x, w, k_blocks=b)
    for warps, bk in ((16, 16384), (32, 16384), (16, 4096)):  # the one-launch prep's shape
        yield f"rows prep w{warps} bk{bk}", 1, lambda x, w, a=warps, c=bk: split_dot(
            *split_rows(x, steps=SPLIT_STEPS, num_warps=a, block_k=c), w, 2)
    yield "ours M=8", 8, lambda x, w: quantized_matmul(x, w)
    yield "xla int8", 1, lambda x, w: quantized_matmul(x, w, impl="xla")
    yield "bf16", 1, lambda x, w: jnp.dot(x, w)


def per_layer_us(fn, xs, ws) -> float:
    f = jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)])
    jax.block_until_ready(f(xs, ws))
    return 1e6 * bench_common.gpu_span_per_call(f, xs, ws) / len(ws)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gate_up,down,down_kmajor,qkv")
    p.add_argument("--pads", default="4,8,16,32")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--out", default="experiments/results/qmatmul_diag")
    args = p.parse_args(argv)
    pads = [int(r) for r in args.pads.split(",")]
    bw = bench_common.measure_copy_bandwidth()
    rows = []
    for shape in args.shapes.split(","):
        k, n, fmt = SHAPES[shape]
        keys = jax.random.split(jax.random.PRNGKey(0), args.layers)
        ws = {f: [random_weight(kk, f, k, n) for kk in keys] for f in (fmt, "bf16")}
        for name, m, fn in variants(pads):
            wf = "bf16" if name == "bf16" else fmt
            x = (jax.random.normal(jax.random.PRNGKey(1), (m, k), jnp.float32)).astype(jnp.bfloat16)
            xs = bench_common.distinct_inputs(x, args.layers)
            if name.startswith("given"):  # the digits made outside the timed call
                r = fn or 2
                ins = [prep(x) for x in xs]
                fn_t = lambda sd, w, r=r: split_dot(*sd, w, r)  # noqa: E731
                y = fn_t(ins[0], ws[wf][0])
            else:
                ins, fn_t = xs, fn
                y = fn(xs[0], ws[wf][0])
            if name != "bf16":
                ref = quantized_matmul_reference(xs[0], ws[wf][0]).astype(jnp.float32)
                err = float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / (jnp.max(jnp.abs(ref)) + 1e-30))
                if not np.isfinite(err) or err > 2e-2:
                    raise SystemExit(f"{shape} {name}: relative error {err} against the reference")
            us = per_layer_us(fn_t, ins, ws[wf])
            nbytes = weight_bytes(ws[wf][0])
            rows.append(dict(shape=shape, variant=name, m=m, us=round(us, 3),
                             frac_bw=round(nbytes / (us * 1e-6) / bw, 4)))
            print(shape, name, m, f"{us:.2f} us", f"{rows[-1]['frac_bw']:.3f}", flush=True)
    summary = {}
    for shape in args.shapes.split(","):
        t = {r["variant"]: r["us"] for r in rows if r["shape"] == shape}
        best = min((v for v in t if v.startswith("pad")), key=t.get)
        summary[shape] = dict(ours_us=t["ours"], best_pad=best, best_pad_us=t[best], given_us=t["given"],
                              ours_m8_us=t["ours M=8"], bf16_us=t["bf16"], xla_int8_us=t["xla int8"],
                              ours_vs_bf16=round(t["bf16"] / t["ours"], 3),
                              best_pad_vs_bf16=round(t["bf16"] / t[best], 3),
                              best_pad_vs_xla_int8=round(t["xla int8"] / t[best], 3))
    summary["copy_bw_tbs"] = round(bw / 1e12, 3)
    bench_common.write_results(args.out, f"diag_int8_split_rows_{bench_common.gpu_tag()}", rows=rows,
                               summary=summary, columns=["shape", "variant", "m", "us", "frac_bw"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
