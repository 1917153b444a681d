"""Can XLA's own int8 x int8 dot carry weight-only int8 at decode sizes? (a diagnosis for issue 3)

At M=1 XLA's int8 x int8 -> int32 dot on a K-major weight [N, K] read GLM-4-9B's gate_up at 0.99 of copy
bandwidth (session 1), while the Pallas GEMV on [K, N] reached 0.62-0.78. Weight-only int8 keeps bf16
activations; this times, on GLM-4-9B's gate_up and down shapes at M in {1, 8, 32}, each as 8 distinct layers
unrolled in one jit (bench_qmatmul.time_layers):

* ``bf16``: XLA's bf16 dot (the baseline);
* ``ours_int8``: this project's int8 weight-only ``quantized_matmul`` (weight [K, N]);
* ``xla_i8i8_kn`` / ``xla_i8i8_nk``: XLA's int8 x int8 -> int32 dot on a [K, N] / [N, K] weight (activations
  already int8: the W8A8 ceiling);
* ``split_kn`` / ``split_nk``: weight-only int8 with bf16 activations carried exactly enough by two int8
  digits per element (x / absmax(x) * 127 * 128 = 128 * hi + lo, |hi| <= 127, |lo| <= 64): one int8 dot of
  [2M, K] x the weight, recombined as (128 * Y_hi + Y_lo) * absmax / (127 * 128) * scale. The activation
  then has 15 bits of fixed point per row (bf16 has 8 bits of mantissa); the error is checked against
  the float dot of the dequantized weight.

    python experiments/diag_int8_dot.py --out $OUT     # GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import bench_common  # noqa: E402
from bench_qmatmul import time_layers  # noqa: E402
from kernels_pallas import Int8Weight, quantized_matmul  # noqa: E402
from kernels_pallas.quantized_matmul import split_digits  # noqa: E402

SHAPES = {"gate_up": (4096, 27392), "down": (13696, 4096)}


def split_dot(x, wq, scale, k_major: bool):
    m = x.shape[0]
    step, d = split_digits(x.astype(jnp.float32), axis=1)  # the library's digits (int8_split_matmul's)
    dims = (((1,), (1,)), ((), ())) if k_major else (((1,), (0,)), ((), ()))
    y = lax.dot_general(d, wq, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    return ((128.0 * y[:m] + y[m:]) * step * scale).astype(x.dtype)


def i8i8(x8, wq, k_major: bool):
    dims = (((1,), (1,)), ((), ())) if k_major else (((1,), (0,)), ((), ()))
    return lax.dot_general(x8, wq, dims, preferred_element_type=jnp.int32)


def diag_args(doc: str):
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=".")
    return ap.parse_args()


def time_variant(rows: list[dict], shape: str, m: int, label: str, fn, x, ws, nbytes: int, err, bw,
                 timing: str = "wall") -> None:
    """Times ``fn`` over the layers ``ws`` (time_layers; ``timing`` "wall" or "trace") and appends its row (or the
    error, and goes on)."""
    try:
        t, _ = time_layers(fn, x, ws, timing=timing)
    except Exception as ex:  # noqa: BLE001 -- recorded, the others go on
        rows.append({"shape": shape, "m": m, "variant": label, "error": bench_common.error_text(ex)})
    else:
        rows.append({"shape": shape, "m": m, "variant": label, "us": 1e6 * t, "weight_bytes": nbytes,
                     "frac_bw": nbytes / t / bw if bw else None, "rel_err_vs_f32": err})
    print(json.dumps(rows[-1]), flush=True)


def write_diag(rows: list[dict], bw, out: str, name: str) -> None:
    """Adds ``speedup_vs_bf16`` to each timed row and writes ``<name>_<gpu>.json`` under ``out``; prints a table."""
    key = lambda r: (r["shape"], r["m"], r.get("round"))  # noqa: E731 -- rows of a repeated run: its own round's bf16
    base = {key(r): r["us"] for r in rows if r["variant"] == "bf16" and "us" in r}
    for r in rows:
        if "us" in r and key(r) in base:
            r["speedup_vs_bf16"] = base[key(r)] / r["us"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_{bench_common.gpu_tag()}.json").write_text(json.dumps(
        {"device": bench_common.device_info(), "versions": bench_common.versions(), "copy_bandwidth": bw,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "rows": rows}, indent=2))
    print(bench_common.markdown_table(rows, ["shape", "m", "variant", "us", "frac_bw", "speedup_vs_bf16",
                                             "rel_err_vs_f32"]))


def main():
    args = diag_args(__doc__)
    bw = bench_common.measure_copy_bandwidth() if jax.default_backend() == "gpu" else None
    rows = []
    for name, (k, n) in SHAPES.items():
        keys = jax.random.split(jax.random.key(0), args.layers)
        q_kn = [jax.random.randint(kk, (k, n), -127, 128, jnp.int32).astype(jnp.int8) for kk in keys]
        q_nk = [q.T.copy() for q in q_kn]
        scale = jax.random.uniform(jax.random.key(1), (n,), jnp.float32, 1e-3, 1e-2)
        w_bf16 = [(q.astype(jnp.float32) * scale).astype(jnp.bfloat16) for q in q_kn[:args.layers]]
        ours = [Int8Weight(qweight=q, scale=scale) for q in q_kn]
        for m in args.ms:
            x = jax.random.normal(jax.random.key(2 + m), (m, k), jnp.float32).astype(jnp.bfloat16)
            x8 = jax.random.randint(jax.random.key(3), (m, k), -127, 128, jnp.int32).astype(jnp.int8)
            ref = jnp.dot(x.astype(jnp.float32), q_kn[0].astype(jnp.float32) * scale,
                          precision=lax.Precision.HIGHEST)
            err = lambda y: float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
            variants = {
                "bf16": (lambda x, w: jnp.dot(x, w), x, w_bf16, 2 * k * n, err(jnp.dot(x, w_bf16[0]))),
                "ours_int8": (lambda x, w: quantized_matmul(x, w), x, ours, k * n,
                              err(quantized_matmul(x, ours[0]))),
                "xla_i8i8_kn": (lambda x, w: i8i8(x, w, False), x8, q_kn, k * n, None),
                "xla_i8i8_nk": (lambda x, w: i8i8(x, w, True), x8, q_nk, k * n, None),
                "split_kn": (lambda x, w: split_dot(x, w, scale, False), x, q_kn, k * n,
                             err(split_dot(x, q_kn[0], scale, False))),
                "split_nk": (lambda x, w: split_dot(x, w, scale, True), x, q_nk, k * n,
                             err(split_dot(x, q_nk[0], scale, True))),
            }
            for label, (fn, xin, ws, nbytes, e) in variants.items():
                time_variant(rows, name, m, label, fn, xin, ws, nbytes, e, bw)
    write_diag(rows, bw, args.out, "diag_int8_dot")

if __name__ == "__main__":
    main()
