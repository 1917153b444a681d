"""ncu worker (session 29): one int8-KV paged decode launch at (batch 32, context 8192, page 16) with the tuned
table's blocks, called three times (compile, warm, profiled). Run from the repo root under ncu:
    ncu --kernel-name regex:paged_decode_g --launch-skip 1 --launch-count 1 --set full -o rep python THIS
"""
import sys

import numpy as np
import jax

sys.path.insert(0, ".")
from experiments import bench_paged_attention as bench  # noqa: E402

quantized = len(sys.argv) < 2 or sys.argv[1] == "int8"
batch, ctx = (32, 8192) if quantized else (32, 2048)
bench.LAYERS = 1
layers, q, lengths, rot = bench.make_decode_inputs(np.random.default_rng(0), batch, ctx, 16, quantized)
kp, vp, ks, vs, tables = layers[0]
f = jax.jit(bench.ours())
for _ in range(3):
    out = f(q[0][0], kp, vp, lengths, tables[0], ks, vs)
jax.block_until_ready(out)
print("done", out.shape)
