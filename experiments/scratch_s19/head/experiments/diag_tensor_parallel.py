"""Where a tensor-parallel decode step spends its time (a diagnosis, not a benchmark).

For GLM-4-9B (random bf16 weights) at tensor degree ``--tp``, one batch size: the optimized HLO of the
decode step (its collectives counted, the text saved), the wall time per decode step, and a
``jax.profiler`` trace of ``--steps`` steps whose GPU activity is summed per HLO op (or kernel) name, per
device, with collectives and gaps (device idle time inside the traced span) reported separately.

    python experiments/diag_tensor_parallel.py --tp 2 --batch 1 --out $OUT     # GPU, 2 devices
    python experiments/diag_tensor_parallel.py --tp 1 --quant int4 --layout auto --out $OUT   # one GPU, int4 weights

Writes ``diag_tensor_parallel_tp<t>_b<B>.json`` (+ the HLO text) under ``--out``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all|nccl|AllReduce",
                        re.IGNORECASE)
GEMM = re.compile(r"gemm|dot|cublas|matmul", re.IGNORECASE)


def gpu_activity(xplane: str, steps: int, top: int) -> dict:
    """Per GPU plane: busy time by op name, collectives' share, idle gaps, all per decode step."""
    from jax.profiler import ProfileData

    out = {}
    for plane in ProfileData.from_file(xplane).planes:
        if "GPU" not in plane.name:
            continue
        by_name = collections.Counter()
        count = collections.Counter()
        by_kind = collections.Counter()  # op names without their numeric suffixes: one entry per kind of op
        kind_count = collections.Counter()
        by_kernel = collections.Counter()  # the launched kernel's own name (a Pallas kernel's name= shows here)
        kernel_count = collections.Counter()
        spans = []
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                name = str(stats.get("hlo_op") or ev.name)
                by_name[name] += ev.duration_ns
                count[name] += 1
                kind = re.sub(r"[._]\d+", "", name)
                by_kind[kind] += ev.duration_ns
                kind_count[kind] += 1
                by_kernel[ev.name] += ev.duration_ns
                kernel_count[ev.name] += 1
                spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
        if not spans:
            continue
        spans.sort()
        busy, end = 0.0, spans[0][0]
        for s, e in spans:  # union of intervals: time any stream of this device was busy
            if e > end:
                busy += e - max(s, end)
                end = e
        span = spans[-1][1] - spans[0][0]
        coll = sum(v for k, v in by_name.items() if COLLECTIVE.search(k))
        gemm = sum(v for k, v in by_name.items() if GEMM.search(k) and not COLLECTIVE.search(k))
        out[plane.name] = {
            "span_us_per_step": span / steps / 1e3, "busy_us_per_step": busy / steps / 1e3,
            "idle_us_per_step": (span - busy) / steps / 1e3, "collective_us_per_step": coll / steps / 1e3,
            "gemm_us_per_step": gemm / steps / 1e3, "other_us_per_step": (sum(by_name.values()) - coll - gemm) / steps / 1e3,
            "collective_calls_per_step": sum(v for k, v in count.items() if COLLECTIVE.search(k)) / steps,
            "top_ops": [{"name": k, "us_per_step": v / steps / 1e3, "calls_per_step": count[k] / steps}
                        for k, v in by_name.most_common(top)],
            "top_kinds": [{"name": k, "us_per_step": v / steps / 1e3, "calls_per_step": kind_count[k] / steps}
                          for k, v in by_kind.most_common(top)],
            "top_kernels": [{"name": k, "us_per_step": v / steps / 1e3, "calls_per_step": kernel_count[k] / steps}
                            for k, v in by_kernel.most_common(top)]}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="decode steps traced")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--preset", default="glm-4-9b", help="model preset (tiny: a CPU smoke run)")
    ap.add_argument("--quant", default="none", help="none, int8 or int4: weights quantized as bench_decode.py does "
                    "(the LM head kept in bfloat16)")
    ap.add_argument("--layout", default="auto", help="with --quant: kn, nk or auto (autoglm quantize's layouts)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    if args.quant != "none":
        from autoglm_jax.quant.cli import layout_error
        if args.quant not in ("int8", "int4"):
            ap.error(f"--quant must be none, int8 or int4; got {args.quant!r}")
        if message := layout_error(args.quant, args.layout):
            ap.error(message)
        if args.tp != 1:
            ap.error("--quant profiles one GPU (--tp 1) only")

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.loading import random_model
    from sharding import make_mesh, shard_model

    cfg = GLMConfig.from_preset(args.preset)
    model = random_model(cfg, dtype="bfloat16", seed=0)
    if args.quant != "none":
        from autoglm_jax.model.quantized_linear import quantize_model
        from autoglm_jax.quant.cli import LAYOUTS
        quantize_model(model, fmt=args.quant, k_major=LAYOUTS[args.layout], keep_float=("lm_head",))
    sm = model if args.tp == 1 else shard_model(model, make_mesh(tensor=args.tp))
    del model
    for b in args.batch:
        diagnose(sm, cfg, b, args)


def diagnose(sm, cfg, b: int, args) -> None:
    import jax
    import numpy as np

    from autoglm_jax.generate import CACHE_BUCKET, GenerationConfig, decode_hlo, decode_stream
    from autoglm_jax.kv_cache import DenseKVCache
    from sharding import cache_shardings, make_mesh

    new = args.steps + 1
    cache_len = -(-(args.prompt + new) // CACHE_BUCKET) * CACHE_BUCKET
    make_cache = lambda: DenseKVCache.create(sm.cfg, b, cache_len, sm.dtype)
    if args.tp > 1:
        make_cache = jax.jit(make_cache, out_shardings=cache_shardings(jax.eval_shape(make_cache), make_mesh(tensor=args.tp)))
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, args.prompt)).astype(np.int32).tolist()
    gen_cfg = GenerationConfig(max_new_tokens=new, eos_token_ids=())

    def run(trace_dir=None):
        cache = make_cache()
        steps = decode_stream(sm, prompts, gen_cfg, cache=cache)
        next(steps).block_until_ready()
        if trace_dir:  # the decode steps only, not the prefill
            jax.profiler.start_trace(trace_dir)
        t = time.perf_counter()
        for tok in steps:
            pass
        tok.block_until_ready()
        took = (time.perf_counter() - t) / args.steps
        if trace_dir:
            jax.profiler.stop_trace()
        return took

    run()  # compiles
    wall = [run() for _ in range(3)]
    hlo = decode_hlo(sm, make_cache(), position=args.prompt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"diag_tensor_parallel_tp{args.tp}_b{b}" + ("" if args.quant == "none" else f"_{args.quant}_{args.layout}")
    (out / f"{stem}.hlo.txt").write_text(hlo)
    ops = collections.Counter(m.group(1) for m in re.finditer(
        r"= \S+ (all-reduce-start|all-reduce|all-gather-start|all-gather|reduce-scatter|collective-permute-start|"
        r"all-to-all|custom-call|fusion|copy-start|copy)\(", hlo))

    with tempfile.TemporaryDirectory() as tmp:
        traced = run(trace_dir=tmp)
        pb = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        activity = gpu_activity(pb[0], args.steps, args.top) if pb else {"error": "no xplane.pb written"}
    doc = {"tp": args.tp, "quant": args.quant, "layout": args.layout if args.quant != "none" else None,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": b, "prompt": args.prompt, "steps": args.steps,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "devices": [d.device_kind for d in jax.devices()], "jax": jax.__version__,
           "wall_ms_per_step": [1e3 * w for w in wall], "traced_wall_ms_per_step": 1e3 * traced,
           "hlo_op_counts": dict(ops), "gpu": activity}
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    print(json.dumps({k: v for k, v in doc.items() if k not in ("gpu", "devices")}))
    for plane, a in (activity.items() if isinstance(activity, dict) else []):
        if not isinstance(a, dict):
            continue
        print(f"{plane}: span {a['span_us_per_step']:.0f} us/step, busy {a['busy_us_per_step']:.0f}, idle "
              f"{a['idle_us_per_step']:.0f}, gemm {a['gemm_us_per_step']:.0f}, other {a['other_us_per_step']:.0f}, collectives {a['collective_us_per_step']:.0f} us "
              f"({a['collective_calls_per_step']:.0f} calls)")
        for t in a["top_ops"][:15]:
            print(f"   {t['us_per_step']:8.1f} us  x{t['calls_per_step']:.0f}  {t['name'][:90]}")
        print("  by kind of op:")
        for t in a["top_kinds"][:25]:
            print(f"   {t['us_per_step']:8.1f} us  x{t['calls_per_step']:.0f}  {t['name'][:90]}")


if __name__ == "__main__":
    main()
