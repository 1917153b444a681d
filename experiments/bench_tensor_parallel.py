"""Tensor-parallel decode: GLM-4-9B (random weights) at tensor degree 1 vs 2 (and 4, 8 when the devices exist),
all in one process: identical greedy tokens, batch-1 ms/token, batch-32 tokens/s, speedups.

    python experiments/bench_tensor_parallel.py     # GPU: GLM-4-9B bf16 -> results/tensor_parallel_<gpu>x<N>.*
    python experiments/bench_tensor_parallel.py --tiny --out /tmp   # CPU smoke run (8 virtual devices, tiny shapes)

Each degree t uses ``sharding.shard_model(model, make_mesh(tensor=t))`` (column-parallel q/k/v and gate/up,
row-parallel o_proj / down_proj, vocab-parallel LM head, embedding table split along D, KV heads repeated to t) and the
same jitted prefill / decode step as ``autoglm_jax.generate`` (dense KV cache created sharded). Decode steps
are chained on device without host syncs; ``ms_per_token`` = decode time / (new tokens - 1), and
``tokens_per_s`` = batch x (new tokens - 1) / decode time (prefill excluded; reported separately).
``roofline_ms`` is the per-device parameter bytes over the copy bandwidth measured on device 0 in this run.
Floors (2 H100s): tp2_speedup_b1 >= 1.4, tp2_speedup_b32 >= 1.6. ``tokens_identical`` in the summary is the
float32 check (``--check-dtype``: ``--check-batch`` prompts, ``--check-new`` greedy tokens, every degree against
degree 1); the timed bfloat16 runs' own token comparison is ``tokens_identical_bfloat16``, where the
all-reduce's summation order may flip a near-tie argmax of random weights.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(Path(__file__).parent))
import bench_common  # noqa: E402

FLOORS = {"tp2_speedup_b1": 1.4, "tp2_speedup_b32": 1.6}


def run_degree(model, tp: int, args, cfg, rows, tokens_by):
    import jax
    import numpy as np
    from flax import nnx

    from autoglm_jax.generate import CACHE_BUCKET, GenerationConfig, decode_stream
    from autoglm_jax.kv_cache import DenseKVCache
    from sharding import cache_shardings, make_mesh, per_device_bytes, shard_model

    t0 = time.perf_counter()
    if tp == 1:
        sm, mesh = model, None
    else:
        mesh = make_mesh(tensor=tp)
        sm = shard_model(model, mesh)
    jax.block_until_ready(nnx.state(sm))
    shard_s = time.perf_counter() - t0
    dev_bytes = max(per_device_bytes(nnx.state(sm)).values())
    rng = np.random.default_rng(0)
    gen_cfg = GenerationConfig(max_new_tokens=args.new, eos_token_ids=())
    for batch in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, args.prompt)).astype(np.int32).tolist()
        cache_len = -(-(args.prompt + args.new) // CACHE_BUCKET) * CACHE_BUCKET
        make_cache = lambda: DenseKVCache.create(sm.cfg, batch, cache_len, sm.dtype)
        if mesh is not None:
            make_cache = jax.jit(make_cache, out_shardings=cache_shardings(jax.eval_shape(make_cache), mesh))

        def run_once():
            # generate()'s device loop (decode_stream) on the (sharded) model and a cache sharded like it.
            cache = make_cache()
            jax.block_until_ready(cache)
            t = time.perf_counter()
            steps = decode_stream(sm, prompts, gen_cfg, cache=cache)
            out = [next(steps)]
            out[0].block_until_ready()
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            out.extend(steps)
            out[-1].block_until_ready()
            return t_prefill, time.perf_counter() - t, np.stack([np.asarray(o) for o in out], 1)

        tc = time.perf_counter()
        run_once()  # compiles
        compile_s = time.perf_counter() - tc
        runs = [run_once() for _ in range(args.reps)]
        decode_s = statistics.median(r[1] for r in runs)
        tokens_by[(tp, batch)] = runs[-1][2]
        rows.append(dict(tensor_parallel=tp, batch=batch, prompt=args.prompt, new_tokens=args.new,
                         ms_per_token=1e3 * decode_s / (args.new - 1),
                         tokens_per_s=batch * (args.new - 1) / decode_s,
                         prefill_s=statistics.median(r[0] for r in runs), compile_s=compile_s, shard_s=shard_s,
                         param_gib_per_device=dev_bytes / 2**30))
        print(rows[-1], flush=True)



def check_tokens(cfg, degrees, args, dtype: str) -> dict:
    """Greedy tokens of every degree against degree 1 with ``dtype`` weights (a float32 check: in bfloat16 the
    all-reduce's other summation order can flip a near-tie argmax of random weights; that is not a bug)."""
    import numpy as np

    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.loading import random_model
    from sharding import make_mesh, shard_model

    batch, new = args.check_batch, args.check_new
    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, args.prompt)).astype(np.int32).tolist()
    gen_cfg = GenerationConfig(max_new_tokens=new, eos_token_ids=())
    model = random_model(cfg, dtype=dtype, seed=0)
    out = {}
    for tp in degrees:  # (under highest matmul precision: on GPU float32 dots default to TF32)
        sm = model if tp == 1 else shard_model(model, make_mesh(tensor=tp))
        out[tp] = np.stack([np.asarray(t) for t in decode_stream(sm, prompts, gen_cfg)], 1)
    base = out[1]
    return {f"tp{tp}_identical": bool(np.array_equal(base, out[tp])) for tp in degrees[1:]} | {
        "dtype": dtype, "batch": batch, "prompt": args.prompt, "new_tokens": new}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on 8 virtual CPU devices (smoke run)")
    ap.add_argument("--tp", type=int, nargs="*", default=None, help="degrees (default 1 2 4 8 up to the devices)")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    ap.add_argument("--out", default=str(bench_common.RESULTS))
    ap.add_argument("--check-dtype", default="float32", help="weights of the token-identity check ('' = skip)")
    ap.add_argument("--check-batch", type=int, default=4)
    ap.add_argument("--check-new", type=int, default=32)
    args = ap.parse_args()

    import jax
    import numpy as np

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.loading import random_model

    if args.tiny:
        cfg = GLMConfig.from_preset("tiny").replace(num_heads=8, head_dim=32, vocab_size=1024)
        args.prompt, args.new = min(args.prompt, 16), min(args.new, 8)
        dtype = args.dtype or "float32"
    else:
        cfg = GLMConfig.from_preset("glm-4-9b")
        dtype = args.dtype or "bfloat16"
    n_dev = jax.device_count()
    degrees = args.tp or [t for t in (1, 2, 4, 8) if t <= n_dev]
    if 1 not in degrees or any(t > n_dev for t in degrees):
        raise SystemExit(f"--tp {degrees}: needs 1 (the baseline) and at most {n_dev} (devices present)")
    bandwidth = bench_common.measure_copy_bandwidth() if jax.default_backend() == "gpu" else None
    model = random_model(cfg, dtype=dtype, seed=0)
    rows, tokens_by = [], {}
    for tp in degrees:
        run_degree(model, tp, args, cfg, rows, tokens_by)
    del model
    check = None
    if args.check_dtype:
        with jax.default_matmul_precision("highest"):
            check = check_tokens(cfg, degrees, args, args.check_dtype)
    by = {(r["tensor_parallel"], r["batch"]): r for r in rows}
    for r in rows:
        base = by[(1, r["batch"])]
        r["speedup"] = base["ms_per_token"] / r["ms_per_token"]
        first = tokens_by[(1, r["batch"])]
        mine = tokens_by[(r["tensor_parallel"], r["batch"])]
        r["tokens_identical"] = bool(np.array_equal(first, mine))
        r["first_diverging_step"] = (None if r["tokens_identical"] else
                                     int(np.argmax((first != mine).any(0))))
        if bandwidth:
            r["roofline_ms"] = 1e3 * r["param_gib_per_device"] * 2**30 / bandwidth
            r["frac_of_roofline"] = r["roofline_ms"] / r["ms_per_token"]
    summary = {"model": "tiny(N=8)" if args.tiny else "glm-4-9b", "dtype": dtype,
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "degrees": degrees, f"tokens_identical_{dtype}": all(r["tokens_identical"] for r in rows)}
    if check:
        summary["token_check"] = check
        summary["tokens_identical"] = all(v for k, v in check.items() if k.endswith("_identical"))
    else:
        summary["tokens_identical"] = summary[f"tokens_identical_{dtype}"]
    b_lo, b_hi = min(args.batch), max(args.batch)
    for tp in degrees[1:]:
        summary[f"tp{tp}_speedup_b{b_lo}"] = by[(tp, b_lo)]["speedup"]
        summary[f"tp{tp}_speedup_b{b_hi}"] = by[(tp, b_hi)]["speedup"]
    summary.update({f"tp{tp}_b{b_lo}_ms_per_token": by[(tp, b_lo)]["ms_per_token"] for tp in degrees})
    summary.update({f"tp{tp}_b{b_hi}_tokens_per_s": by[(tp, b_hi)]["tokens_per_s"] for tp in degrees})
    if bandwidth:
        summary["copy_bandwidth_tb_s"] = bandwidth / 1e12
    for key, floor in FLOORS.items():
        if key in summary:
            summary[f"{key}_floor"] = floor
            summary[f"{key}_meets_floor"] = bool(summary[key] >= floor)
    cols = ["tensor_parallel", "batch", "ms_per_token", "tokens_per_s", "speedup", "tokens_identical",
            "first_diverging_step", "prefill_s", "param_gib_per_device", "roofline_ms", "frac_of_roofline",
            "compile_s"]
    name = f"tensor_parallel_{bench_common.gpu_tag()}x{max(degrees)}"
    notes = __doc__.split("\n\n", 2)[2] + ("\nCPU smoke run (virtual devices share the host cores): timings mean "
                                           "nothing, token identity does." if args.tiny else "")
    print(bench_common.write_results(args.out, name, rows=rows, summary=summary, columns=cols, notes=notes))


if __name__ == "__main__":
    main()
