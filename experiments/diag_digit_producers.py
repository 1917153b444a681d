"""The activation-digit producers of a batch-1 decode step, kernel by kernel (issue 6's int4 / int8 decode).

A quantized GEMV at batch 1 takes x as int8 digits (``kernels_pallas.act_digits``). They come from one launch
before the GEMV (``qmatmul_dp4a.digit_planes_pallas``, ``quantize_rows.split_rows``, XLA's ``split_digits``) or
from the kernel that produced x (``add_rms_norm(..., digits=)``, ``swiglu.swiglu_digits``). This times each way at
GLM-4-9B's sizes (the norm's D = 4096, SwiGLU's F = 13696) over ``--layers`` distinct inputs unrolled in one jit, by
GPU span in a profiler trace (``bench_common.gpu_span_per_call``), per layer, with the launches' warp counts varied:

* ``norm`` (plain ``add_rms_norm``) and ``norm+prep`` (it, then the digit launch) against ``norm_digits``;
* ``xla swiglu + prep`` (XLA's SwiGLU fusion, then the digit launch) against ``swiglu_digits``;
* the int4 planes prep alone, by groups a program and warps (a step per group: many programs).

    python experiments/diag_digit_producers.py --out $OUT        # GPU
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

import bench_common  # noqa: E402
from kernels_pallas.act_digits import SPLIT_STEPS  # noqa: E402
from kernels_pallas.add_rms_norm import add_rms_norm  # noqa: E402
from kernels_pallas.qmatmul_dp4a import digit_planes_pallas  # noqa: E402
from kernels_pallas.quantize_rows import split_rows  # noqa: E402
from kernels_pallas.quantized_matmul import split_digits  # noqa: E402

from kernels_pallas.swiglu import swiglu_digits  # noqa: E402


def swiglu_reference(gate_up):
    """XLA's SwiGLU of a [R, 2F] gate/up row, as the model's MLP writes it."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return up * jax.nn.silu(gate)


EPS = 1.5625e-07


def per_layer_us(fn, inputs) -> float:
    f = jax.jit(lambda ins: [fn(*a) for a in ins])
    return 1e6 * bench_common.gpu_span_per_call(f, inputs) / len(inputs)


def variants(d: int, f: int, group: int):
    norm = lambda w: lambda x, r, s: add_rms_norm(x, r, s, eps=EPS, num_warps=w)  # noqa: E731
    yield "norm", "norm w4", norm(4)
    yield "norm", "norm w4 + planes prep g4 w4", lambda x, r, s: digit_planes_pallas(norm(4)(x, r, s)[0], group)
    yield "norm", "norm w4 + rows prep w16", lambda x, r, s: split_rows(norm(4)(x, r, s)[0], steps=SPLIT_STEPS)
    for w in (4, 8, 16):
        yield "norm", f"norm_digits planes w{w}", lambda x, r, s, w=w: add_rms_norm(x, r, s, eps=EPS, num_warps=w,
                                                                                    digits=group)
    yield "norm", "norm_digits rows w16", lambda x, r, s: add_rms_norm(x, r, s, eps=EPS, num_warps=16, digits=0)
    for g, w in ((4, 4), (8, 4), (2, 2), (16, 8), (1, 1)):
        yield "norm", f"planes prep alone g{g} w{w} (K = D)", lambda x, r, s, g=g, w=w: digit_planes_pallas(
            x, group, groups=g, num_warps=w)
        yield "swiglu", f"planes prep alone g{g} w{w} (K = F)", lambda gu, g=g, w=w: digit_planes_pallas(
            gu[:, :f], group, groups=g, num_warps=w)
    yield "swiglu", "xla swiglu", swiglu_reference
    yield "swiglu", "xla swiglu + planes prep g4 w4", lambda gu: digit_planes_pallas(swiglu_reference(gu), group)
    yield "swiglu", "xla swiglu + xla rows digits", lambda gu: split_digits(
        swiglu_reference(gu).astype(jnp.float32), axis=1)
    for g, w in ((4, 4), (8, 4), (2, 2), (16, 8), (1, 1)):
        yield "swiglu", f"swiglu_digits g{g} w{w}", lambda gu, g=g, w=w: swiglu_digits(gu, group, groups=g,
                                                                                       num_warps=w)


def summarize(rows: list[dict]) -> dict:
    """Per producer and layout: the fastest separate launches (producer, then the digit prep), the fastest fused
    launch and their ratio (> 1: the fused launch is faster), all from this run. These launches move a few tens of KB
    each and are latency-bound: a copy-bandwidth roofline (~0.02 us) says nothing about them, the same-run ratio does."""
    us = {r["variant"]: r["us"] for r in rows if "us" in r}

    def best(prefix):
        vals = [v for k, v in us.items() if k.startswith(prefix)]
        return min(vals) if vals else None

    out = {}
    for key, separate, fused in (("norm_planes", "norm w4 + planes prep", "norm_digits planes"),
                                 ("norm_rows", "norm w4 + rows prep", "norm_digits rows"),
                                 ("swiglu_planes", "xla swiglu + planes prep", "swiglu_digits")):
        s, f = best(separate), best(fused)
        out.update({f"{key}_separate_us": s, f"{key}_fused_us": f,
                    f"{key}_speedup": s / f if s is not None and f is not None else None})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=13696)
    ap.add_argument("--group", type=int, default=128)
    args = ap.parse_args()
    keys = iter(jax.random.split(jax.random.key(0), 4 * args.layers))
    bf = jnp.bfloat16
    norm_in = [(jax.random.normal(next(keys), (1, args.d), bf), 3 * jax.random.normal(next(keys), (1, args.d), bf),
                (1 + 0.1 * jax.random.normal(next(keys), (args.d,))).astype(bf)) for _ in range(args.layers)]
    glu_in = [(2 * jax.random.normal(next(keys), (1, 2 * args.f), bf),) for _ in range(args.layers)]
    rows = []
    for site, label, fn in variants(args.d, args.f, args.group):
        try:
            us = per_layer_us(fn, norm_in if site == "norm" else glu_in)
            rows.append({"site": site, "variant": label, "us": us})
        except Exception as e:  # noqa: BLE001 -- a variant that does not compile is reported, the rest go on
            rows.append({"site": site, "variant": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    bench_common.write_results(args.out, f"diag_digit_producers_{bench_common.gpu_tag()}", rows=rows,
                               summary=summarize(rows), columns=["site", "variant", "us", "error"],
                               extra={"layers": args.layers, "d": args.d, "f": args.f, "group": args.group,
                                      "timing": "trace"}, notes=__doc__)


if __name__ == "__main__":
    main()
