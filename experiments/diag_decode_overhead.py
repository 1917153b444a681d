"""Where does a decode step's time go beyond reading the weights? Compares XLA flag variants per process.

    python experiments/diag_decode_overhead.py --layers 10 --batch 1

Each variant runs in a fresh process (XLA flags are read at start-up) and reports the decode step time,
the bytes of weights read, the number of kernels in the compiled step, and the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = {
    "default": "",
    "command_buffers": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN "
                       "--xla_gpu_graph_min_graph_size=1",
    "no_command_buffers": "--xla_gpu_enable_command_buffer=",
    # cuBLAS instead of XLA's Triton GEMM fusions (the batch-32 step's GEMMs read the weights at ~0.88 of copy
    # bandwidth, results/tp_diag/decode_profile/README.md)
    "cublas_gemm": "--xla_gpu_enable_triton_gemm=false",
    "cublaslt_gemm": "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true",
    # a wider search over Triton GEMM tilings at compile time
    "exhaustive_tiling": "--xla_gpu_exhaustive_tiling_search=true",
    # Programmatic Dependent Launch (Hopper+): XLA's own kernels may launch before their predecessor ends and wait
    # in-kernel (griddepcontrol), hiding launch latency
    "pdl_on": "--xla_gpu_enable_pdl=true",
    "pdl_off": "--xla_gpu_enable_pdl=false",
}


def worker(args):
    import jax
    import jax.numpy as jnp

    import bench_common
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import _decode
    from autoglm_jax.model.static_graph import StaticGraph
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.loading import random_model

    smoke = jax.default_backend() == "cpu"  # a quick check of this script on a CPU
    cfg = GLMConfig.from_preset("tiny" if smoke else "glm-4-9b", num_layers=args.layers)
    model = random_model(cfg, dtype="bfloat16")
    graph, state = StaticGraph.split(model)
    b = args.batch
    cache = DenseKVCache.create(cfg, b, 640, jnp.bfloat16, decode_kernel=args.decode_kernel)
    tok = jnp.zeros((b,), jnp.int32)
    z, zk, o = jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.float32)
    pos = jnp.full((b,), 512, jnp.int32)
    key, step0 = jax.random.key(0), jnp.int32(1)
    text = _decode.lower(graph, state, tok, pos, cache, key, step0, z, zk, o, True).compile().as_text()
    entry = text[text.find("ENTRY"):]
    kernels = len(re.findall(r"= \S+ (fusion|custom-call|convolution|dot|scatter|gather)\(", entry))
    for _ in range(3):
        tok, _, _, cache = _decode(graph, state, tok, pos, cache, key, step0, z, zk, o, True)
    tok.block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(32):
            tok, _, _, cache = _decode(graph, state, tok, pos, cache, key, step0, z, zk, o, True)
        tok.block_until_ready()
        times.append((time.perf_counter() - t) / 32)
    step = statistics.median(times)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state)) - model.embed[...].nbytes
    bw = bench_common.measure_copy_bandwidth(64 << 20 if smoke else 4 << 30)
    # One GEMV alone, 8 distinct layers unrolled: gate_up [4096, 27392] at M=b.
    din, dout = (256, 512) if smoke else (4096, 27392)
    ws = [jax.random.normal(jax.random.key(i), (din, dout), jnp.bfloat16) for i in range(8)]
    xs = bench_common.distinct_inputs(jax.random.normal(jax.random.key(99), (b, din), jnp.bfloat16), 8)  # one x a
    f = jax.jit(lambda xs, ws: sum(x @ w for x, w in zip(xs, ws)))  # layer: a shared x lets XLA merge the dots
    t_gemv = bench_common.time_fn(f, xs, ws) / 8
    res = dict(variant=args.variant, decode_kernel=args.decode_kernel, layers=args.layers, batch=b,
               step_ms=step * 1e3, kernels=kernels,
               weight_gb=weight_bytes / 1e9, copy_tb_s=bw / 1e12,
               step_frac_of_roofline=(weight_bytes / bw) / step,
               per_layer_overhead_us=1e6 * (step - weight_bytes / bw) / args.layers,
               gate_up_gemv_us=t_gemv * 1e6, gate_up_frac_bw=(din * dout * 2 / t_gemv) / bw)
    print("RESULT " + json.dumps(res), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--decode-kernel", default="auto", help="DenseKVCache.decode_kernel: auto, pallas or xla")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return worker(args)
    for v in args.variants.split(","):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[v]).strip())
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--layers", str(args.layers),
                              "--batch", str(args.batch), "--decode-kernel", args.decode_kernel],
                             env=env, capture_output=True, text=True)
        lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
        print(lines[0][7:] if lines else f"{v}: failed\n{out.stderr[-2000:]}", flush=True)


if __name__ == "__main__":
    main()
