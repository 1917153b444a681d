"""Can XLA's own dot read int4 weights at full bandwidth? (a diagnosis for issue 3's int4 floor)

Our Pallas int4 GEMV reads GLM-4-9B's gate_up at about half of copy bandwidth (1.5x bf16 at M=1, where the
floor is 3x). XLA keeps ``jnp.int4`` arrays packed two per byte on GPU and can fuse the widening convert of a
dot operand into its GEMM (Triton) or GEMV (reduction) fusion. This times, on gate_up and down at M in
{1, 8, 32}, each as 8 distinct layers unrolled in one jit (bench_qmatmul.time_layers):

* ``bf16``: XLA's bf16 dot (the baseline); ``ours_int4_g128``: this project's ``quantized_matmul``;
* ``s4_channel_kn`` / ``s4_channel_nk``: per-channel int4, ``dot(x, w4.astype(bf16)) * scale`` on a [K, N]
  / [N, K] weight (the convert fused or not is what is measured);
* ``s4_group_dequant_kn`` / ``_nk``: group-128 int4 dequantized in the operand (convert, times the group's
  scale broadcast along K, reshape to [K, N]) then one dot: fused, it reads the int4 bytes once;
* ``s4_group_batched_nk``: group-128 as a dot batched over groups ([G, M, N] float32 partials) then scaled
  and summed over G;
* ``s4_split_nk``: per-channel int4 under the two-int8-digit activation split of diag_int8_dot (int8 x s4
  -> int32, the convert to int8 fused or not).

    python experiments/diag_int4_dot.py --out $OUT     # GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import bench_common  # noqa: E402
from diag_int8_dot import diag_args, time_variant, write_diag  # noqa: E402
from kernels_pallas import quantize, quantized_matmul  # noqa: E402
from kernels_pallas.quantized_matmul import split_digits  # noqa: E402

SHAPES = {"gate_up": (4096, 27392), "down": (13696, 4096)}
GROUP = 128


def channel_kn(x, w, scale):
    return (jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * scale).astype(x.dtype)


def channel_nk(x, w, scale):
    y = lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * scale).astype(x.dtype)


def group_dequant_kn(x, w, gscale):  # w [G, g, N] int4, gscale [G, N]
    g, gs, n = w.shape
    wd = (w.astype(x.dtype) * gscale[:, None, :].astype(x.dtype)).reshape(g * gs, n)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def group_dequant_nk(x, w, gscale):  # w [N, G, g] int4, gscale [N, G]
    n, g, gs = w.shape
    wd = (w.astype(x.dtype) * gscale[:, :, None].astype(x.dtype)).reshape(n, g * gs)
    y = lax.dot_general(x, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def group_batched_nk(x, w, gscale):  # w [N, G, g] int4, gscale [N, G]
    m = x.shape[0]
    n, g, gs = w.shape
    y = jnp.einsum("mgk,ngk->gmn", x.reshape(m, g, gs), w.astype(x.dtype), preferred_element_type=jnp.float32)
    return jnp.einsum("gmn,ng->mn", y, gscale).astype(x.dtype)


def split_nk(x, w, scale):
    m = x.shape[0]
    step, d = split_digits(x.astype(jnp.float32), axis=1)
    y = lax.dot_general(d, w.astype(jnp.int8), (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return ((128.0 * y[:m] + y[m:]).astype(jnp.float32) * step * scale).astype(x.dtype)


def main():
    args = diag_args(__doc__)
    bw = bench_common.measure_copy_bandwidth() if jax.default_backend() == "gpu" else None
    rows = []
    for name, (k, n) in SHAPES.items():
        g = k // GROUP
        keys = jax.random.split(jax.random.key(0), args.layers)
        w_kn = [jax.random.randint(kk, (k, n), -8, 8, jnp.int32).astype(jnp.int4) for kk in keys]
        w_nk = [w.T.copy() for w in w_kn]
        scale = jax.random.uniform(jax.random.key(1), (n,), jnp.float32, 1e-3, 1e-2)
        gscale_kn = jax.random.uniform(jax.random.key(2), (g, n), jnp.float32, 1e-3, 1e-2)
        gscale_nk = gscale_kn.T.copy()
        w_gkn = [w.reshape(g, GROUP, n) for w in w_kn]
        w_ngk = [w.reshape(n, g, GROUP) for w in w_nk]
        w_bf16 = [(w.astype(jnp.float32) * scale).astype(jnp.bfloat16) for w in w_kn]
        wf = jax.random.normal(jax.random.key(4), (k, n), jnp.float32)
        ours = [quantize(wf * (1 + 0.01 * i), "int4", group=GROUP) for i in range(args.layers)]
        dq = (w_kn[0].astype(jnp.float32).reshape(g, GROUP, n) * gscale_kn[:, None, :]).reshape(k, n)
        for m in args.ms:
            x = jax.random.normal(jax.random.key(2 + m), (m, k), jnp.float32).astype(jnp.bfloat16)
            xf = x.astype(jnp.float32)
            ref_c = jnp.dot(xf, w_kn[0].astype(jnp.float32) * scale, precision=lax.Precision.HIGHEST)
            ref_g = jnp.dot(xf, dq, precision=lax.Precision.HIGHEST)
            err = lambda y, ref: float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            half = k * n // 2
            def s4(f, ws, sc, ref):  # an int4 variant: f(x, w, sc) over the layers ws, its error on layer 0
                return (lambda x, w: f(x, w, sc), ws, half, err(f(x, ws[0], sc), ref))

            variants = {
                "bf16": (lambda x, w: jnp.dot(x, w), w_bf16, 2 * k * n, None),
                "ours_int4_g128": (lambda x, w: quantized_matmul(x, w), ours, half, None),
                "s4_channel_kn": s4(channel_kn, w_kn, scale, ref_c),
                "s4_channel_nk": s4(channel_nk, w_nk, scale, ref_c),
                "s4_group_dequant_kn": s4(group_dequant_kn, w_gkn, gscale_kn, ref_g),
                "s4_group_dequant_nk": s4(group_dequant_nk, w_ngk, gscale_nk, ref_g),
                "s4_group_batched_nk": s4(group_batched_nk, w_ngk, gscale_nk, ref_g),
                "s4_split_nk": s4(split_nk, w_nk, scale, ref_c),
            }
            for label, (fn, ws, nbytes, e) in variants.items():
                time_variant(rows, name, m, label, fn, x, ws, nbytes, e, bw)
    write_diag(rows, bw, args.out, "diag_int4_dot")


if __name__ == "__main__":
    main()
