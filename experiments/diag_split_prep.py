"""The ``xla_split`` int8 path's activation digits: XLA's fusions against one Pallas launch (issue 3, M <= 32).

``int8_split_matmul`` writes x as two int8 digits a element (a row step from the row's absmax) before XLA's int8
dot. ``prep="xla"`` leaves that to XLA (a row reduction, then the digits), ``prep="kernel"`` writes them in one
Pallas launch (``quantize_rows.split_rows``). Each variant is timed as distinct layers, each with its own x
(``bench_qmatmul.time_layers``), by its GPU span in a profiler trace; the weights are int8 in the layout
``k_major="auto"`` gives (K-major unless K > N), as the file of record's ``int8_auto`` rows. Each ``check`` row
records whether the two preps' outputs were equal (on the H100 they differ where XLA's quotient x / step is not
the correctly rounded one, a step on a few elements).

    python experiments/diag_split_prep.py --out $OUT [--ms 1,8,32] [--rounds 2]     # GPU
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
from bench_qmatmul import SHAPES, layers_for, random_weight, time_layers  # noqa: E402
from diag_int8_dot import write_diag  # noqa: E402
from kernels_pallas.quantized_matmul import int8_split_matmul  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--ms", default="1,8,32")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    bw = bench_common.measure_copy_bandwidth()
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        layers = layers_for(k, n, args.layers, 512)
        ws = [random_weight(kk, "int8_auto", k, n) for kk in jax.random.split(jax.random.key(0), layers)]
        for m in map(int, args.ms.split(",")):
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            a, b = (int8_split_matmul(x, ws[0], prep=p) for p in ("xla", "kernel"))
            rows.append({"shape": name, "m": m, "variant": "check", "equal": bool(np.array_equal(a, b))})
            print(json.dumps(rows[-1]), flush=True)
            variants = [("bf16", lambda x, w: x @ w, [w.dequantize(jnp.bfloat16) for w in ws])]
            variants += [(f"split_{p}", lambda x, w, p=p: int8_split_matmul(x, w, prep=p).astype(x.dtype), ws)
                         for p in ("xla", "kernel")]
            for rnd in range(args.rounds):
                for label, fn, items in variants:
                    t, _ = time_layers(fn, x, items, timing="trace")
                    rows.append({"shape": name, "m": m, "variant": label, "round": rnd, "us": 1e6 * t,
                                 "weight_bytes": ws[0].nbytes() if label != "bf16" else 2 * k * n,
                                 "frac_bw": (ws[0].nbytes() if label != "bf16" else 2 * k * n) / t / bw})
                    print(json.dumps(rows[-1]), flush=True)
            write_diag(rows, bw, args.out, "diag_split_prep")


if __name__ == "__main__":
    main()
