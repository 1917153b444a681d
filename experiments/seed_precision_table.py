"""The seed's precision table, measured: GLM-4-9B shapes (random weights) at FP32, BF16, FP16, INT8 weight-only,
INT4 (g128, symmetric) and W8A8 (dynamic per-token activations) on one GPU.

    python experiments/seed_precision_table.py                              # all six (about 15 min on an H100)
    python experiments/seed_precision_table.py --variants fp32,bf16,fp16    # a subset (each <10 min call) ...
    python experiments/seed_precision_table.py --variants int8,int4,w8a8    # ... merged with earlier workers
    python experiments/seed_precision_table.py --preset tiny --new 8 --prompt 16 --out /tmp/t   # CPU smoke run
    python experiments/seed_precision_table.py --variants int8 --int8-layout nk   # row int8_nk: K-major int8
    python experiments/seed_precision_table.py --variants int8 --int8-layout auto # row int8_auto: per weight

``--int8-layout nk`` runs the int8 variant with its weights stored K-major, ``qweight[N, K]`` (``Int8Weight.k_major``,
served by XLA's int8 dot or the Pallas K-major tiles), as the row ``int8_nk`` (worker file ``_seed_precision_int8_nk.json``), beside the
default ``[K, N]`` row ``int8`` when both have run; ``--int8-layout auto`` picks per weight (nk unless K > N:
down_proj stays kn, ``k_major="auto"``), as the row ``int8_auto``. ``--int4-layout nk`` / ``auto`` does the same for
int4 (``Int4Weight.k_major``, the GPU's one-row integer-dot GEMV; ``auto``: K-major for every weight since session 14), rows
``int4_nk`` / ``int4_auto``; the int4 summary key takes the fastest int4 layout that ran (``int4_layout`` says which).

Each variant runs ``experiments/bench_decode.py``'s JAX worker (``_jax_worker``: random weights in the float
dtype, ``quantize_model(model, fmt=...)`` for the quantized ones, then prefill + greedy decode with the dense
cache) in its own process, so peak memory is per variant. Per variant: parameter bytes (exact), the process's
peak device memory (``memory_stats()['peak_bytes_in_use']``; for the quantized variants it includes the
bfloat16 weights that exist before quantization -- a quantized checkpoint loaded with ``from_pretrained`` never
holds them, so ``param_bytes`` is the serving number), decode ms/token at batch 1 and tokens/s at batch 32.
Ratios are against FP32 and BF16 measured in the same run, beside the seed's claims (FP16: 50% memory, 1.8x
speed; INT8: 25% memory, 3.5x speed; latency 120 ms FP32 / 85 ms FP16 / 68 ms INT8 -- the seed gives no model,
batch or hardware for them). Copy bandwidth (the roofline: parameter bytes / bandwidth per batch-1 token) is
measured in each worker. FP32 matmuls run at XLA's default precision (TF32 on H100).

Writes experiments/results/seed_precision_table_<gpu>.{json,md}; worker outputs stay in
``<out>/_seed_precision_<variant>.json`` (with the device they ran on) so subsets can be run in separate calls
and merged: copy them into one directory and run ``--variants '' --out DIR`` (no workers, only the table).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common  # noqa: E402

# variant -> (float dtype, quantization format or "none")
VARIANTS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "fp16": ("float16", "none"),
            "int8": ("bfloat16", "int8"), "int4": ("bfloat16", "int4"), "w8a8": ("bfloat16", "w8a8")}
SEED = {"fp32": {"memory": 1.0, "speed": 1.0, "latency_ms": 120.0},
        "fp16": {"memory": 0.5, "speed": 1.8, "latency_ms": 85.0},
        "int8": {"memory": 0.25, "speed": 3.5, "latency_ms": 68.0}}


def _tag(variant: str, layout: str) -> str:
    """Row / worker-file name: ``int8_nk`` / ``int8_auto`` (``int4_nk`` / ``int4_auto``) for the int8 (int4) run in
    those layouts, else the variant."""
    return f"{variant}_{layout}" if (variant in ("int8", "int4") and layout != "kn") else variant


def _layout(quant: str, args) -> str:
    return {"int8": args.int8_layout, "int4": args.int4_layout}.get(quant, "kn")


def _worker(variant: str, args) -> dict:
    import bench_decode

    dtype, quant = VARIANTS[variant]
    layout = _layout(quant, args)
    layouts = {f"{fmt}_layout": layout if quant == fmt else "kn" for fmt in ("int8", "int4")}  # bench_decode's names
    ns = argparse.Namespace(preset=args.preset, dtype=dtype, quant=quant, prompt=args.prompt, new=args.new,
                            reps=args.reps, batch=args.batch, hf_budget_s=0.0, keep_float=args.keep_float,
                            digits=args.digits, **layouts)
    res = bench_decode._jax_worker(ns)
    res.update(variant=_tag(variant, layout), dtype=dtype, quant=quant, digits=args.digits, **layouts,
               keep_float=args.keep_float if quant != "none" else None,
               device=bench_common.device_info(),
               gpu_tag=bench_common.gpu_tag(), versions=bench_common.versions())
    return res


def _pick(res: dict, batch: int, key: str):
    for r in res["rows"]:
        if r.get("batch") == batch and key in r:
            return r[key]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--preset", default="glm-4-9b")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--int8-layout", default="kn",
                   help="the int8 variant's weights: kn ([K, N], default), nk (K-major [N, K]; row int8_nk) or "
                        "auto (per weight: nk unless K > N; row int8_auto)")
    p.add_argument("--int4-layout", default="kn",
                   help="the int4 variant's weights: kn ([K/2, N], default), nk (K-major [N, K/2], the one-row "
                        "integer-dot kernel; row int4_nk) or auto (nk for every weight; row int4_auto)")
    p.add_argument("--keep-float", default="lm_head",
                   help="quantized variants: layer patterns kept in float ('' quantizes the LM head too)")
    p.add_argument("--digits", choices=["auto", "all", "off"], default="auto",
                   help="quantized variants: which input digits the norms write (QuantizedLinear.take_digits; "
                        "bench_decode.py --digits)")
    p.add_argument("--out", default=str(bench_common.RESULTS))
    p.add_argument("--name", default=None, help="result name (default seed_precision_table_<gpu>)")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from autoglm_jax.quant.cli import layout_error

    for fmt, layout in (("int8", args.int8_layout), ("int4", args.int4_layout)):
        if message := layout_error(fmt, layout):
            p.error(message)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(_worker(args.worker, args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; allowed: {list(VARIANTS)}")
    for v in wanted:
        cmd = [sys.executable, __file__, "--worker", v, "--int8-layout", args.int8_layout,
               "--int4-layout", args.int4_layout, "--keep-float", args.keep_float, "--digits", args.digits,
               "--worker-out", str(out / f"_seed_precision_{_tag(v, _layout(VARIANTS[v][1], args))}.json"),
               "--preset", args.preset, "--prompt", str(args.prompt), "--new", str(args.new),
               "--reps", str(args.reps), "--batch", *map(str, args.batch)]
        print(f"--- {v}: {' '.join(cmd[1:])}", flush=True)
        r = subprocess.run(cmd)
        if r.returncode:
            print(f"{v}: worker failed (exit {r.returncode}); continuing", flush=True)
    results = {}
    # this call's workers and earlier ones (subsets run in separate calls)
    for v in [*VARIANTS, "int8_nk", "int8_auto", "int4_nk", "int4_auto"]:
        f = out / f"_seed_precision_{v}.json"
        if f.exists():
            results[v] = json.loads(f.read_text())
    rows = []
    for v, res in results.items():
        b1 = _pick(res, 1, "ms_per_token")
        bw = res.get("bandwidth")
        rows.append(dict(variant=v, dtype=res["dtype"], quant=res["quant"],
                         int8_layout=res.get("int8_layout", "kn") if res["quant"] == "int8" else None,
                         int4_layout=res.get("int4_layout", "kn") if res["quant"] == "int4" else None,
                         param_gib=res["param_bytes"] / 2**30,
                         peak_gib=res["peak_bytes"] / 2**30 if res.get("peak_bytes") else None,
                         b1_ms_per_token=b1, b32_tokens_per_s=_pick(res, max(args.batch), "tokens_per_s"),
                         b1_roofline_ms=1e3 * res["param_bytes"] / bw if bw else None,
                         b1_frac_of_roofline=(1e3 * res["param_bytes"] / bw / b1) if (bw and b1) else None,
                         # the stricter figure: the bytes a step reads (the embedding table is only gathered from)
                         b1_frac_of_read_roofline=(1e3 * res["read_bytes"] / bw / b1)
                         if (bw and b1 and res.get("read_bytes")) else None,
                         copy_bandwidth_tb_s=bw / 1e12 if bw else None))
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for ref in ("fp32", "bf16"):
            base = by.get(ref)
            if base:
                r[f"memory_vs_{ref}"] = r["param_gib"] / base["param_gib"]
                if r["b1_ms_per_token"] and base["b1_ms_per_token"]:
                    r[f"b1_speedup_vs_{ref}"] = base["b1_ms_per_token"] / r["b1_ms_per_token"]
                if r["b32_tokens_per_s"] and base["b32_tokens_per_s"]:
                    r[f"b32_speedup_vs_{ref}"] = r["b32_tokens_per_s"] / base["b32_tokens_per_s"]
        seed = SEED.get(r["variant"])
        if seed:
            r.update(seed_memory_vs_fp32=seed["memory"], seed_speedup_vs_fp32=seed["speed"],
                     seed_latency_ms=seed["latency_ms"])
    get = lambda v, k: by.get(v, {}).get(k)
    # The int8 keys the issue names take the fastest of the int8 layouts that ran (int8_layout says which).
    int8 = max((v for v in ("int8", "int8_nk", "int8_auto") if get(v, "b1_speedup_vs_bf16")),
               key=lambda v: get(v, "b1_speedup_vs_bf16"), default="int8")
    int4 = max((v for v in ("int4", "int4_nk", "int4_auto") if get(v, "b1_speedup_vs_bf16")),
               key=lambda v: get(v, "b1_speedup_vs_bf16"), default="int4")  # likewise for int4
    summary = {"int8_b1_speedup_vs_bf16": get(int8, "b1_speedup_vs_bf16"),
               "int8_layout": by.get(int8, {}).get("int8_layout"),
               "int8_kn_b1_speedup_vs_bf16": get("int8", "b1_speedup_vs_bf16"),
               "int8_nk_b1_speedup_vs_bf16": get("int8_nk", "b1_speedup_vs_bf16"),
               "int8_auto_b1_speedup_vs_bf16": get("int8_auto", "b1_speedup_vs_bf16"),
               "int4_b1_speedup_vs_bf16": get(int4, "b1_speedup_vs_bf16"),
               "int4_layout": by.get(int4, {}).get("int4_layout"),
               "int4_kn_b1_speedup_vs_bf16": get("int4", "b1_speedup_vs_bf16"),
               "fp16_b1_speedup_vs_fp32": get("fp16", "b1_speedup_vs_fp32"),
               "w8a8_b1_speedup_vs_bf16": get("w8a8", "b1_speedup_vs_bf16"),
               "int8_b1_speedup_vs_fp32": get(int8, "b1_speedup_vs_fp32"),
               "fp16_memory_vs_fp32": get("fp16", "memory_vs_fp32"), "int8_memory_vs_fp32": get(int8, "memory_vs_fp32"),
               "int4_memory_vs_fp32": get(int4, "memory_vs_fp32"),
               "seed_claims": "FP16 50% memory 1.8x speed, INT8 25% memory 3.5x speed (vs FP32); "
                              "latency 120 / 85 / 68 ms (FP32 / FP16 / INT8)",
               "setup": {"preset": args.preset, "prompt": args.prompt, "new_tokens": args.new, "batches": args.batch,
                         "reps": args.reps, "digits": args.digits}}
    if not results:
        p.error(f"no worker results in {out}")
    first = next(iter(results.values()))  # the measuring machine (merging may run elsewhere)
    tags = {r.get("gpu_tag") for r in results.values()}
    if len(tags) > 1:
        print(f"warning: worker results come from different devices {sorted(map(str, tags))}", flush=True)
    summary["workers"] = {v: {"device": r.get("device"), "versions": r.get("versions")} for v, r in results.items()}
    name = args.name or f"seed_precision_table_{first.get('gpu_tag') or bench_common.gpu_tag()}"
    bench_common.write_results(out, name, rows=rows, summary=summary, device=first.get("device"),
                               versions_=first.get("versions"),
                               columns=["variant", "param_gib", "peak_gib", "b1_ms_per_token", "b32_tokens_per_s",
                                        "memory_vs_fp32", "b1_speedup_vs_fp32", "b1_speedup_vs_bf16",
                                        "b32_speedup_vs_bf16", "b1_frac_of_roofline", "b1_frac_of_read_roofline",
                                        "seed_memory_vs_fp32",
                                        "seed_speedup_vs_fp32", "seed_latency_ms"],
                               notes=__doc__)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
