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
degree 1; None when ``--check-dtype ''`` skips it); the timed bfloat16 runs' own token comparison is
``tokens_identical_bfloat16``, where the all-reduce's summation order may flip a near-tie argmax of random weights.

``--quant int8`` / ``int4``: weight-only int8 (K-major) or int4 g128 (K-major) weights at every degree, the LM head
bfloat16; ``--quant-impl`` their ``QuantizedLinear.impl``: ``auto`` (default since session 27: the Pallas kernels,
per shard under a mesh, ``sharding.kernels.sharded_quantized_matmul``) or ``xla_split`` / ``xla`` (XLA dots that
GSPMD partitions; int8 ran ``xla_split`` in every earlier result file). ``allreduce_us`` per row: one all-reduce
of the [batch, D] bfloat16 residual over the degree's devices, timed as 64 dependent all-reduces in one jit.
``--large``: a GLM-shaped config that one device cannot hold (GLM-4-32B-0414 layer shapes: D 6144, 48 query / 8 KV
heads, F 23040; as many layers as it takes to pass the first device's memory by 5%), created directly sharded
(random weights), timed at the degrees where it fits (its random weights are drawn per degree in that degree's
column layout, so its tokens are not compared). ``--replot JSON`` redraws the plot of a finished run.

    python experiments/bench_tensor_parallel.py --tp 1 2 4 --batch 1 32 128            # 4 GPUs
    python experiments/bench_tensor_parallel.py --tp 1 2 4 --quant int8 --large --check-dtype ''
"""

from __future__ import annotations

import argparse
import functools
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

FLOORS = {"tp2_speedup_b1": 1.4, "tp2_speedup_b32": 1.6, "tp4_speedup_b32": 2.5}
# GLM-4-32B-0414's layer shapes; --large sets num_layers so that the parameters exceed one device's memory.
LARGE = dict(model_type="glm4", vocab_size=151552, hidden_size=6144, intermediate_size=23040, num_heads=48,
             num_kv_heads=8, head_dim=128, partial_rotary_factor=0.5, rope_theta=10000.0, attention_bias=False,
             rms_norm_eps=1e-05, max_position_embeddings=32768, post_norms=True, eos_token_ids=(151329,),
             pad_token_id=151329, num_layers=1)


def allreduce_us(mesh, batch: int, d: int, chain: int = 64) -> float:
    """Microseconds per all-reduce of a [batch, d] bfloat16 array over ``mesh``'s tensor axis (``chain``
    dependent all-reduces in one jit, median of 5)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding.kernels import _shard_map

    def body(x):  # x: this device's [batch, d] partial sum
        for _ in range(chain):
            x = jax.lax.psum(x, "tensor") * 0.5
        return x

    f = jax.jit(_shard_map(body, mesh, (P("tensor"),), P("tensor")))
    t = mesh.shape["tensor"]
    x = jax.device_put(np.ones((t * batch, d), jnp.bfloat16), NamedSharding(mesh, P("tensor")))  # host data:
    # every process passes the same array (several processes) and gets its own shards
    jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times) / chain


def large_config(device_bytes: int):
    """GLM-4-32B-0414 layer shapes with enough layers for 1.05x ``device_bytes`` of bfloat16 parameters."""
    from autoglm_jax.config import GLMConfig

    one = GLMConfig(**LARGE)
    per_layer = 2 * (one.replace(num_layers=2).num_params() - one.num_params())  # bytes
    rest = 2 * one.num_params() - per_layer  # embedding, LM head, final norm
    cfg = one.replace(num_layers=-(-(int(1.05 * device_bytes) - rest) // per_layer))
    return cfg, 2 * cfg.num_params()


def sharded_random_model(cfg, mesh, dtype: str, seed: int = 0):
    """A model of ``cfg`` with random weights created directly in its tensor-parallel shards (it may not fit
    one device). Weights are random, so the TP column permutation is moot; only the layout marks are set."""
    import jax
    from flax import nnx

    from autoglm_jax.model import GLMForCausalLM
    from sharding import layout as tp
    from sharding.partition import param_shardings, set_tp_layout

    t = mesh.shape["tensor"]
    plan = tp.plan(cfg, t)
    shaped = tp.tp_config(cfg, plan)  # KV heads repeated to t when K < t (as shard_model does)
    abstract = nnx.eval_shape(lambda: GLMForCausalLM(shaped, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed)))
    shards = jax.tree.leaves(param_shardings(abstract, mesh))
    graphdef, state = nnx.split(abstract)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))

    @functools.cache  # one compilation per distinct (shape, dtype, sharding): the layers share them
    def maker(shape, dtype, sharding, norm: bool):
        def init(key):
            x = jax.random.normal(key, shape, dtype)
            return 1.0 + 0.02 * x if norm else cfg.initializer_range * x
        return jax.jit(init, out_shardings=sharding)

    keys = jax.random.split(jax.random.key(seed), len(leaves))
    tree = treedef.unflatten([
        maker(a.shape, a.dtype, sh, a.ndim == 1 and a.shape[0] == cfg.hidden_size)(k)
        for k, a, sh in zip(keys, leaves, shards)])  # leaf by leaf: one jit of ~1000 outputs took minutes
    nnx.replace_by_pure_dict(state, tree)
    model = nnx.merge(graphdef, state)
    if t > 1:
        set_tp_layout(model, plan, shaped)
    return model


def run_degree(model, tp: int, args, cfg, rows, tokens_by, *, label: str, build=None):
    """Times ``model`` (or, with ``build``, the model ``build(mesh)`` creates already sharded) at degree ``tp``
    for every batch of ``args.batch``; appends a row per batch and keeps its greedy tokens in ``tokens_by``."""
    import jax
    import numpy as np
    from flax import nnx

    from autoglm_jax.generate import CACHE_BUCKET, GenerationConfig, decode_stream
    from autoglm_jax.kv_cache import DenseKVCache
    from sharding import cache_shardings, make_mesh, per_device_bytes, shard_model

    t0 = time.perf_counter()
    mesh = make_mesh(tensor=tp) if (tp > 1 or build is not None) else None
    if build is not None:
        sm = build(mesh)
    elif tp == 1:
        sm = model
    else:
        sm = shard_model(model, mesh)
    jax.block_until_ready(nnx.state(sm))
    shard_s = time.perf_counter() - t0
    dev_bytes = max(per_device_bytes(nnx.state(sm)).values())
    read_bytes = bench_common.decode_read_bytes(sm, dev_bytes, tensor=tp)
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
        tokens_by[(label, tp, batch)] = runs[-1][2]
        rows.append(dict(model=label, tensor_parallel=tp, batch=batch, prompt=args.prompt, new_tokens=args.new,
                         ms_per_token=1e3 * decode_s / (args.new - 1),
                         tokens_per_s=batch * (args.new - 1) / decode_s,
                         prefill_s=statistics.median(r[0] for r in runs), compile_s=compile_s, shard_s=shard_s,
                         param_gib_per_device=dev_bytes / 2**30, read_gib_per_device=read_bytes / 2**30,
                         allreduce_us=allreduce_us(mesh, batch, cfg.hidden_size) if tp > 1 else None))
        print(rows[-1], flush=True)


def greedy_tokens(cfg, tp: int, args, dtype: str, model=None):
    """[check_batch, check_new] greedy tokens of the model (random weights, seed 0, ``dtype``) at degree ``tp``."""
    import numpy as np

    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.loading import random_model
    from sharding import make_mesh, shard_model

    prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (args.check_batch, args.prompt))
    gen_cfg = GenerationConfig(max_new_tokens=args.check_new, eos_token_ids=())
    model = model or random_model(cfg, dtype=dtype, seed=0)
    sm = model if tp == 1 else shard_model(model, make_mesh(tensor=tp))
    return np.stack([np.asarray(t) for t in decode_stream(sm, prompts.astype(np.int32).tolist(), gen_cfg)], 1)


def check_tokens(cfg, degrees, args, dtype: str) -> dict:
    """Greedy tokens of every degree against degree 1 with ``dtype`` weights (a float32 check: in bfloat16 the
    all-reduce's other summation order can flip a near-tie argmax of random weights; that is not a bug). Run it
    under highest matmul precision: on GPU float32 dots default to TF32."""
    from autoglm_jax.loading import random_model

    model = random_model(cfg, dtype=dtype, seed=0)
    return token_check({tp: greedy_tokens(cfg, tp, args, dtype, model) for tp in degrees}, args, dtype)


def token_check(tokens: dict, args, dtype: str) -> dict:
    """The summary's ``token_check``: from {degree: greedy tokens} (degree 1 among them), whether every other
    degree's tokens equal degree 1's, and the check's settings."""
    import numpy as np

    return {f"tp{tp}_identical": bool(np.array_equal(tokens[1], tokens[tp])) for tp in tokens if tp != 1} | {
        "dtype": dtype, "batch": args.check_batch, "prompt": args.prompt, "new_tokens": args.check_new}


def summarize(rows, tokens_by, degrees, args, dtype, check, bandwidth, large_cfg) -> dict:
    """Speedups against the lowest degree of each model (one GPU for GLM-4-9B), token identity, floors."""
    import numpy as np

    by = {(r["model"], r["tensor_parallel"], r["batch"]): r for r in rows}
    for r in rows:
        lo = min(t for (m, t, b) in by if m == r["model"] and b == r["batch"])
        base = by[(r["model"], lo, r["batch"])]
        r["baseline_tp"] = lo
        r["speedup"] = base["ms_per_token"] / r["ms_per_token"]
        r["scaling_efficiency"] = r["speedup"] * lo / r["tensor_parallel"]
        if r["model"] != MAIN:  # --large: each degree draws its own random weights in its own column layout
            r["tokens_identical"] = r["first_diverging_step"] = None
        else:
            first, mine = tokens_by[(MAIN, lo, r["batch"])], tokens_by[(MAIN, r["tensor_parallel"], r["batch"])]
            r["tokens_identical"] = bool(np.array_equal(first, mine))
            r["first_diverging_step"] = None if r["tokens_identical"] else int(np.argmax((first != mine).any(0)))
        if bandwidth:
            r["roofline_ms"] = 1e3 * r["param_gib_per_device"] * 2**30 / bandwidth
            r["frac_of_roofline"] = r["roofline_ms"] / r["ms_per_token"]
            if r.get("read_gib_per_device"):  # the stricter figure: the embedding table is only gathered from
                r["frac_of_read_roofline"] = 1e3 * r["read_gib_per_device"] * 2**30 / bandwidth / r["ms_per_token"]
    main_rows = [r for r in rows if r["model"] == MAIN]
    summary = {"model": MAIN, "dtype": dtype, "quant": args.quant or "none", "quant_impl": args.quant_impl,
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "degrees": degrees,
               f"tokens_identical_{dtype}": all(r["tokens_identical"] for r in main_rows) if main_rows else None}
    if check:
        summary["token_check"] = check
        summary["tokens_identical"] = all(v for k, v in check.items() if k.endswith("_identical"))
    else:  # not checked: the timed runs' own comparison is no verdict (near-tied argmaxes of random weights)
        summary["token_check"] = "skipped (--check-dtype '')"
        summary["tokens_identical"] = None
    got = {(r["tensor_parallel"], r["batch"]): r for r in main_rows}
    for tp in degrees[1:]:
        for b in args.batch:
            if (tp, b) in got:
                summary[f"tp{tp}_speedup_b{b}"] = got[(tp, b)]["speedup"]
    for tp in degrees:
        for b in args.batch:
            if (tp, b) in got:
                key = "ms_per_token" if b == 1 else "tokens_per_s"
                summary[f"tp{tp}_b{b}_{key}"] = got[(tp, b)][key]
                if got[(tp, b)]["allreduce_us"] is not None:
                    summary[f"tp{tp}_b{b}_allreduce_us"] = got[(tp, b)]["allreduce_us"]
    if large_cfg is not None:
        large_rows = [r for r in rows if r["model"] != MAIN]
        summary["large_model"] = {
            "config": {k: getattr(large_cfg, k) for k in ("hidden_size", "intermediate_size", "num_layers",
                                                          "num_heads", "num_kv_heads", "head_dim", "vocab_size")},
            "param_gib": large_cfg.num_params() * 2 / 2**30,
            "device_memory_gib": args.device_gib, "degrees_run": sorted({r["tensor_parallel"] for r in large_rows}),
            "tokens": "not compared: each degree draws random weights in its own tensor-parallel column layout"}
    if bandwidth:
        summary["copy_bandwidth_tb_s"] = bandwidth / 1e12
    for key, floor in FLOORS.items():
        if key in summary:
            summary[f"{key}_floor"] = floor
            summary[f"{key}_meets_floor"] = bool(summary[key] >= floor)
    return summary


COLUMNS = ["model", "tensor_parallel", "batch", "ms_per_token", "tokens_per_s", "speedup", "scaling_efficiency",
           "allreduce_us", "tokens_identical", "first_diverging_step", "prefill_s", "param_gib_per_device",
           "roofline_ms", "frac_of_roofline", "frac_of_read_roofline", "compile_s"]
MAIN = "glm-4-9b"


def plot(json_path: Path) -> Path | None:
    """tokens/s against tensor degree, one line per (model, batch); beside the JSON as .png."""
    plt = bench_common.pyplot_or_none()
    if plt is None:
        return None
    import json

    data = json.loads(Path(json_path).read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    series = sorted({(r["model"], r["batch"]) for r in data["rows"]})
    for model, b in series:
        pts = sorted((r["tensor_parallel"], r["tokens_per_s"]) for r in data["rows"]
                     if r["model"] == model and r["batch"] == b)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} b{b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tensor parallel degree")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{json_path.stem} ({data['device'].get('kind', '')})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(json_path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def bench_model(cfg, dtype: str, quant: str | None, impl: str = "auto"):
    """The benchmarked model: random weights (seed 0) in ``dtype``, K-major ``quant`` weights on ``impl``."""
    from autoglm_jax.loading import random_model
    from autoglm_jax.model.quantized_linear import quantize_model

    model = random_model(cfg, dtype=dtype, seed=0)
    if quant:
        quantize_model(model, quant, impl=impl, k_major=True)
    return model


def add_run_args(ap) -> None:
    """The options this script shares with bench_tensor_parallel_procs.py."""
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on virtual CPU devices (smoke run)")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
    ap.add_argument("--quant", choices=["int8", "int4"], default=None, help="weight-only int8 / int4 g128, K-major")
    ap.add_argument("--quant-impl", choices=["auto", "xla_split", "xla"], default="auto",
                    help="QuantizedLinear.impl: auto = the Pallas kernels (per shard under a mesh)")
    ap.add_argument("--out", default=str(bench_common.RESULTS))
    ap.add_argument("--check-dtype", default="float32", help="weights of the token-identity check ('' = skip)")
    ap.add_argument("--check-batch", type=int, default=4)
    ap.add_argument("--check-new", type=int, default=32)


def model_config(args):
    """(GLMConfig, weight dtype) of the benchmarked model: GLM-4-9B in bfloat16, or with ``--tiny`` a small
    float32 config (and at most 16 prompt / 8 new tokens)."""
    from autoglm_jax.config import GLMConfig

    if args.tiny:
        args.prompt, args.new = min(args.prompt, 16), min(args.new, 8)
        return GLMConfig.from_preset("tiny").replace(num_heads=8, head_dim=32, vocab_size=1024), args.dtype or "float32"
    return GLMConfig.from_preset("glm-4-9b"), args.dtype or "bfloat16"


def main():
    ap = argparse.ArgumentParser()
    add_run_args(ap)
    ap.add_argument("--tp", type=int, nargs="*", default=None, help="degrees (default 1 2 4 8 up to the devices)")
    ap.add_argument("--large", action="store_true", help="also a GLM-shaped model larger than one device")
    ap.add_argument("--large-only", action="store_true", help="the larger model alone (result name *_large)")
    ap.add_argument("--replot", default=None, help="redraw the plot of this result JSON and exit")
    args = ap.parse_args()
    if args.replot:
        print(plot(Path(args.replot)))
        return

    import jax

    cfg, dtype = model_config(args)
    n_dev = jax.device_count()
    degrees = args.tp or [t for t in (1, 2, 4, 8) if t <= n_dev]
    if 1 not in degrees or any(t > n_dev for t in degrees):
        raise SystemExit(f"--tp {degrees}: needs 1 (the baseline) and at most {n_dev} (devices present)")
    on_gpu = jax.default_backend() == "gpu"
    bandwidth = bench_common.measure_copy_bandwidth() if on_gpu else None
    # The device's physical memory: XLA's allocator limit over the fraction it was given (0.75 by default).
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    device_bytes = int(jax.devices()[0].memory_stats()["bytes_limit"] / frac) if on_gpu else 1 << 22
    args.device_gib = device_bytes / 2**30
    args.large = args.large or args.large_only
    name = (f"tensor_parallel_{bench_common.gpu_tag()}x{max(degrees)}" + (f"_{args.quant}" if args.quant else "")
            + ("_large" if args.large_only else ""))
    rows, tokens_by, large_cfg, check = [], {}, None, None
    notes = __doc__.split("\n\n", 2)[2] + ("\nCPU smoke run (virtual devices share the host cores): timings mean "
                                           "nothing, token identity does." if args.tiny else "")

    def write():
        summary = summarize(rows, tokens_by, degrees, args, dtype, check, bandwidth, large_cfg)
        path = bench_common.write_results(args.out, name, rows=rows, summary=summary, columns=COLUMNS, notes=notes)
        plot(path)
        return path

    if not args.large_only:
        model = bench_model(cfg, dtype, args.quant, args.quant_impl)
        for tp in degrees:
            run_degree(model, tp, args, cfg, rows, tokens_by, label=MAIN)
            write()  # a run cut short still leaves the degrees done so far
        del model
    if args.large:
        large_cfg, large_bytes = (large_config(device_bytes) if not args.tiny else
                                  (cfg.replace(num_layers=3, num_kv_heads=4), 0))
        fits = [t for t in degrees if large_bytes / t < 0.8 * device_bytes and (t > 1 or args.tiny)]
        print(f"large model: {large_cfg.num_layers} layers, {large_bytes / 2**30:.1f} GiB of parameters, "
              f"device {args.device_gib:.1f} GiB; degrees {fits}", flush=True)
        for tp in fits:
            run_degree(None, tp, args, large_cfg, rows, tokens_by, label=f"large-{large_cfg.num_layers}L",
                       build=lambda mesh: sharded_random_model(large_cfg, mesh, dtype))
            write()
    if args.check_dtype and not args.large_only:
        with jax.default_matmul_precision("highest"):
            check = check_tokens(cfg, degrees, args, args.check_dtype)
    print(write())


if __name__ == "__main__":
    main()
