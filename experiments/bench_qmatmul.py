"""Benchmark quantized_matmul on GLM-4-9B linear shapes against XLA's dequantize-then-dot and XLA's bf16 dot.

GPU only. For each shape (qkv 4096->4608, o 4096->4096, gate_up 4096->27392, down 13696->4096), each M and
each format: this project's dispatch (``quantized_matmul``, tuned table), XLA's dequantize-then-dot
(``impl="xla"``), and XLA's bf16 dot, all in one run, with the copy bandwidth measured in the same run.
Format ``int8_kmajor`` (``Int8Weight`` stored K-major, ``qweight[N, K]``; the Pallas K-major tiles or XLA, see
``quantized_matmul``) is not in the default ``--formats``; add it to compare layouts:
``--formats int8,int8_kmajor``. ``int4_g128_sym_kmajor`` (``Int4Weight`` stored K-major, ``packed[N, K/2]``: the
integer-dot GEMV at M=1, ``qmatmul_dp4a.py``) is in the default formats; where it ran, the int4 summary key reads it
(the layout ``k_major="auto"`` gives int4), as the int8 keys read ``int8_auto``.
Each op is timed as ``--layers`` distinct layers' weights, each with its own activation x, unrolled in one jit (no
scan, no Python loop of calls; a shared x let XLA compute activation-only work once for all layers, see
``bench_common.distinct_inputs``); ``--timing trace`` (the default) takes a call's GPU span from a profiler trace (first kernel
start to last kernel end: the int4 GEMVs' calls were host-bound, 15 us of kernels a layer against 16-26 us of wall
time),
``--timing wall`` the median wall time of many pipelined calls; ``--rounds R`` times all ops of a (shape, M) R times,
round after round, and each row keeps the median (``us_rounds``: every round). Third-party baselines
(``--baselines qwix,tokamax``, ``qmatmul_baselines.py``) are timed beside them where they import, each checked
against the reference first; the summary says at how many points each beat ours. Writes
experiments/results/qmatmul_<gpu>.{json,md} (or ``--out`` dir).

    python experiments/bench_qmatmul.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from experiments import bench_common, qmatmul_baselines  # noqa: E402
from kernels_pallas import qmatmul_tiles  # noqa: E402
from kernels_pallas.quant_formats import Int4Weight, Int8Weight, W8A8Weight, resolve_k_major  # noqa: E402
from kernels_pallas.quantized_matmul import quantized_matmul, quantized_matmul_reference  # noqa: E402

SHAPES = {"qkv": (4096, 4608), "o": (4096, 4096), "gate_up": (4096, 27392), "down": (13696, 4096)}
MS = (1, 8, 32, 128, 512)
FORMATS = ("int8", "int8_auto", "int4_g128_sym", "int4_g128_sym_kmajor", "w8a8")
EXTRA_FORMATS = ("int4_g128_asym", "int4_g64_sym")  # timed at M=1 only (device budget)


def random_weight(key, fmt: str, k: int, n: int):
    """A random (never zero) weight of the named format; 'bf16' gives a plain [K, N] bf16 matrix;
    'int8_kmajor' an ``Int8Weight`` stored [N, K]; 'int8_auto' the layout ``quantize(..., k_major="auto")``
    picks for a [K, N] weight (``quant_formats.resolve_k_major``)."""
    k1, k2, k3 = jax.random.split(key, 3)
    if fmt == "bf16":
        return (0.02 * jax.random.normal(k1, (k, n), jnp.float32)).astype(jnp.bfloat16)
    if fmt == "int8_auto":
        return random_weight(key, "int8_kmajor" if resolve_k_major("auto", k, n) else "int8", k, n)
    if fmt in ("int8", "int8_kmajor", "w8a8"):
        q = jax.random.randint(k1, (k, n) if fmt == "int8" else (n, k), -127, 128, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(k2, (n,), jnp.float32, 1e-3, 1e-2)
        if fmt == "w8a8":
            return W8A8Weight(qweight=q, scale=s)
        return Int8Weight(qweight=q, scale=s, k_major=fmt == "int8_kmajor")
    _, g, sym, *kmajor = fmt.split("_")  # int4_g128_sym[_kmajor]
    group = int(g[1:])
    packed = jax.random.randint(k1, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
    scale = jax.random.uniform(k2, (k // group, n), jnp.float32, 1e-3, 1e-2).astype(jnp.bfloat16)
    zero = None if sym == "sym" else jax.random.randint(k3, (k // group, n), 0, 16, jnp.int32).astype(jnp.uint8)
    return Int4Weight(packed=packed, scale=scale, zero=zero, group=group).with_layout(bool(kmajor))


def weight_bytes(w) -> int:
    return w.size * w.dtype.itemsize if isinstance(w, jax.Array) else w.nbytes()


def unrolled(fn):
    """The timed call: ``fn(x_i, w_i)`` for each layer i, unrolled in one jit, each layer with its own x."""
    return jax.jit(lambda xs, ws: [fn(x, w) for x, w in zip(xs, ws)])


def layer_timer(fn, x, weights, *, min_sample_s: float = 0.01, samples: int = 5, timing: str = "wall"):
    """Compiles ``fn(x, w)`` over distinct weights, each layer with its own ``x`` (``bench_common.distinct_inputs``), unrolled in
    one jit; returns (compile s, ``measure``), where
    ``measure()`` gives seconds per layer (callable again: rounds): with ``timing="wall"`` the median of ``samples``
    timed batches of calls, with ``"trace"`` the median GPU span of a call in a profiler trace
    (``bench_common.gpu_span_per_call``: kernels only, no host dispatch)."""
    x = bench_common.distinct_inputs(x, len(weights))
    f = unrolled(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, weights))
    compile_s = time.perf_counter() - t0

    def measure() -> float:
        if timing == "trace":
            return bench_common.gpu_span_per_call(f, x, weights) / len(weights)
        t0 = time.perf_counter()
        for _ in range(3):
            out = f(x, weights)
        jax.block_until_ready(out)
        est = (time.perf_counter() - t0) / 3
        inner = max(1, int(min_sample_s / max(est, 1e-6)))
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(inner):
                out = f(x, weights)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times) / len(weights)
    return compile_s, measure


def time_layers(fn, x, weights, *, min_sample_s: float = 0.01, samples: int = 5,
                timing: str = "wall") -> tuple[float, float]:
    """Seconds per layer of ``fn(x, w)`` over distinct weights unrolled in one jit (``layer_timer``); also compile s."""
    compile_s, measure = layer_timer(fn, x, weights, min_sample_s=min_sample_s, samples=samples, timing=timing)
    return measure(), compile_s


def layers_for(k: int, n: int, min_layers: int, min_call_mb: float) -> int:
    """Distinct layers to unroll per timed call: at least ``min_layers`` and enough that an int8 [K, N] weight set
    is >= ``min_call_mb`` MB (at most 64), so one call keeps the GPU busy longer than the host takes to dispatch it
    (measured on the H100: 8 layers of the 19 MB int8 qkv weight timed the same kernel at 10.7 and 15.2 us)."""
    return min(64, max(min_layers, math.ceil(min_call_mb * 2**20 / (k * n))))


def copy_bandwidth() -> float:
    """The memory roofline in bytes/s: bench_common's measurement at its default size (4 GiB), the one every
    benchmark quotes (a 1 GiB array measured 3.63 TB/s on the H200 where the 4 GiB default read 4.44)."""
    return bench_common.measure_copy_bandwidth()


def config_label(c) -> str:
    """A TileConfig (or its dict) as the short label the results tables use; the XLA paths ("xla", "xla_split")
    by their name alone (their tile fields are unused)."""
    c = c if isinstance(c, dict) else c.to_json()
    if c["kernel"] in qmatmul_tiles.XLA_KERNELS:
        return c["kernel"]
    return (f"{c['kernel']} bm{c['block_m']} bn{c['block_n']} bk{c['block_k']} s{c['split_k']} "
            f"w{c['num_warps']} st{c['num_stages']}{' fast' if c['fast_dequant'] else ''}"
            f"{' pf' if c.get('prefetch') else ''}{' asm' if c.get('asm_dequant') else ''}"
            f"{' bf16scale' if c.get('scale_in_bf16') else ''}{' regs' if c.get('weight_regs') else ''}"
            + (f" u{c['unroll']}" if c.get("unroll") else ""))


def gpu_name() -> str:
    return qmatmul_tiles.device_key(jax.devices()[0].device_kind)


def ours(fmt):
    return lambda x, w: quantized_matmul(x, w)


def xla(x, w):
    return quantized_matmul(x, w, impl="xla")


def bf16_dot(x, w):
    return jnp.dot(x, w)


def summarize(rows: list[dict]) -> dict:
    def t(method, fmt, shape, m, run=None):
        for r in rows:
            if (r["method"], r["format"], r["shape"], r["m"]) == (method, fmt, shape, m) and (
                    run is None or r.get("run", 1) == run):
                return r
        return None

    def worst(fn):
        vals = [fn(s) for s in ("gate_up", "down")]
        vals = [v for v in vals if v is not None]
        return min(vals) if vals else None

    # The int8 keys read the per-weight layout the model uses with k_major="auto" where this run timed it.
    int8 = "int8_auto" if any(r["format"] == "int8_auto" for r in rows) else "int8"
    # int4 likewise: k_major="auto" stores int4 K-major (quant_formats.resolve_k_major).
    int4 = "int4_g128_sym_kmajor" if any(r["format"] == "int4_g128_sym_kmajor" for r in rows) else "int4_g128_sym"

    def frac(m):
        def f(s):
            r = t("ours", int8, s, m)
            return None if r is None else r["frac_bw"]
        return f

    def speed(fmt, m, base_method, base_fmt):
        def f(s):
            a = t("ours", fmt, s, m)
            b = None if a is None else t(base_method, base_fmt, s, m, run=a.get("run", 1))
            return None if a is None or b is None else b["us"] / a["us"]
        return f

    ratios = []
    for r in rows:
        if r["method"] == "ours":
            b = t("bf16", "bf16", r["shape"], r["m"], run=r.get("run", 1))
            if b is not None:
                ratios.append(r["us"] / b["us"])
    return {
        "int8_frac_bw_m1": worst(frac(1)),
        "int8_frac_bw_m32": worst(frac(32)),
        "int8_layout": "auto" if int8 == "int8_auto" else "kn",
        "int8_speedup_vs_bf16_m1": worst(speed(int8, 1, "bf16", "bf16")),
        "int8_speedup_vs_xla_int8_m1": worst(speed(int8, 1, "xla", int8)),
        "int4_speedup_vs_bf16_m1": worst(speed(int4, 1, "bf16", "bf16")),
        "int4_layout": "nk" if int4.endswith("_kmajor") else "kn",
        "w8a8_speedup_vs_bf16_m512": worst(speed("w8a8", 512, "bf16", "bf16")),
        "worst_ratio_vs_bf16": max(ratios) if ratios else None,
        **{f"{name}_faster_than_ours": baseline_wins(rows, name) for name in qmatmul_baselines.BASELINES
           if any(r["method"] == name for r in rows)},
    }


def baseline_wins(rows: list[dict], name: str) -> str:
    """'W of P': at how many of the (format, shape, M) points where the baseline ran it beat ours by > 3%, and
    the largest such margin (ours / baseline)."""
    ours_us = {(r["format"], r["shape"], r["m"]): r["us"] for r in rows if r["method"] == "ours"}
    pairs = [(ours_us[k] / r["us"], k) for r in rows if r["method"] == name
             and (k := (r["format"], r["shape"], r["m"])) in ours_us]
    wins = [p for p in pairs if p[0] > 1.03]
    best = max(wins, default=None)
    return f"{len(wins)} of {len(pairs)}" + (f" (most: {best[0]:.2f}x at {best[1]})" if best else "")


def markdown(result: dict) -> str:
    runs = "; ".join(f"run {r['run']}: {r['date']}, memory roofline {r['copy_bw_tbs']:.2f} TB/s, "
                     f"{r.get('timing', 'wall')} timing" for r in result["runs"])
    lines = [f"# quantized_matmul on {result['device']}", "", runs + ".", "",
             f"{result['layers']} distinct layers per jit (at least: rows that record `layers` in the JSON gave a small "
             f"shape more, up to 64, so each call holds >= {result.get('min_call_mb', 512):g} MB of int8 weights); "
             "times are per layer (us): wall timing = wall time of pipelined calls (host-bound where dispatch "
             "outlasts the kernels), trace timing = a call's GPU span in a profiler trace (kernels only); "
             "frac_bw = weight bytes / time / "
             "copy bandwidth of the row's run; ours/bf16 uses the bf16 dot of the same run"
             + (f"; each time is the median of {result['rounds']} rounds (`us_rounds` in the JSON)"
                if result.get("rounds", 1) > 1 else "") + ".", "",
             "| shape | M | format | ours us | frac_bw | xla us | bf16 us | ours/bf16 | xla/ours | config | run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = result["rows"]
    idx = {(r["method"], r["format"], r["shape"], r["m"]): r for r in rows if r["method"] != "bf16"}
    idx.update({("bf16", r["shape"], r["m"], r.get("run", 1)): r for r in rows if r["method"] == "bf16"})
    for r in rows:
        if r["method"] != "ours":
            continue
        x = idx.get(("xla", r["format"], r["shape"], r["m"]))
        b = idx.get(("bf16", r["shape"], r["m"], r.get("run", 1)))
        lines.append(
            f"| {r['shape']} | {r['m']} | {r['format']} | {r['us']:.1f} | {r['frac_bw']:.2f} | "
            f"{x['us'] if x else float('nan'):.1f} | {b['us'] if b else float('nan'):.1f} | "
            f"{r['us'] / b['us'] if b else float('nan'):.2f} | {x['us'] / r['us'] if x else float('nan'):.2f} | "
            f"{r.get('config', '')} | {r.get('run', 1)} |")
    others = [r for r in rows if r["method"] in qmatmul_baselines.BASELINES]
    if others:
        lines += ["", "## Third-party baselines (same run; `qmatmul_baselines.py`)", "",
                  "| shape | M | format | baseline | us | ours us | baseline/ours | bf16 us | rel_err | run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in others:
            o = idx.get(("ours", r["format"], r["shape"], r["m"]))
            b = idx.get(("bf16", r["shape"], r["m"], r.get("run", 1)))
            lines.append(f"| {r['shape']} | {r['m']} | {r['format']} | {r['method']} | {r['us']:.1f} | "
                         f"{o['us'] if o else float('nan'):.1f} | {r['us'] / o['us'] if o else float('nan'):.2f} | "
                         f"{b['us'] if b else float('nan'):.1f} | {r.get('rel_err', float('nan')):.1e} | "
                         f"{r.get('run', 1)} |")
    lines += ["", "## summary", ""] + [f"- {k}: {round(v, 3) if isinstance(v, float) else v}"
                                         for k, v in result["summary"].items()]
    lines += ["", "Baselines not run: " + ("; ".join(result["baselines_missing"]) or "none")]
    for name, why in result.get("baseline_errors", {}).items():  # imported, but failed at these points
        lines += [f"{name} failed at {sum(why.values())} points: "
                  + "; ".join(f"{n} x `{msg}`" for msg, n in why.items())]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--min_call_mb", type=float, default=512,
                    help="more layers for small shapes: at least this many MB of int8 weights per timed call")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--extra_formats", default=",".join(EXTRA_FORMATS), help="timed at M=1 only")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--budget_s", type=float, default=1e9, help="stop adding rows after this many seconds")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every op of a (shape, M) this many times, round after round; rows take the median")
    ap.add_argument("--timing", choices=("trace", "wall"), default="trace",
                    help="trace: GPU time of a call from a profiler trace (its kernels, first start to last end); "
                         "wall: wall time of pipelined calls, host-bound where dispatch outlasts the kernels")
    ap.add_argument("--baselines", default=",".join(qmatmul_baselines.BASELINES),
                    help="third-party baselines to time where importable (qmatmul_baselines.py); '' for none")
    ap.add_argument("--merge_into", default=None,
                    help="a results JSON of the same device: this run's rows replace its rows for the same "
                         "(format, shape, M) and are tagged with a new run number; summary recomputed")
    args = ap.parse_args()
    start = time.time()
    dev = jax.devices()[0]
    formats = args.formats.split(",")
    ms = [int(m) for m in args.ms.split(",")]
    shapes = args.shapes.split(",")
    bw = copy_bandwidth()
    print(f"device {dev.device_kind}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    wanted = [b for b in args.baselines.split(",") if b]
    found = qmatmul_baselines.available()
    baselines = [b for b in wanted if found.get(b)]
    missing = [f"{b}: not importable here (experiments/fetch_baseline_wheels.sh carries it to the device)"
               for b in wanted if not found.get(b)]
    print("baselines:", {b: found.get(b) for b in wanted}, flush=True)
    rows, skipped = [], []
    baseline_errors = {}  # name -> {error: how many (format, shape, M) points it stopped}
    # Summary shapes and Ms first, so a budget cut loses the least important rows.
    order = [(s, m) for m in ms for s in shapes if s in ("gate_up", "down")]
    order += [(s, m) for m in ms for s in shapes if s not in ("gate_up", "down")]

    old = None  # --merge_into: read once, so that the writes after every point (even into that file) merge once
    if args.merge_into:
        with open(args.merge_into) as f:
            old = json.load(f)

    def write(final: bool) -> None:  # after every (shape, M): a timeout keeps what ran
        result = dict(device=dev.device_kind, date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                      versions=dict(jax=jax.__version__, jaxlib=jax.lib.__version__ if hasattr(jax.lib, "__version__")
                                    else None, **{b: found[b] for b in baselines}),
                      copy_bw_tbs=bw / 1e12, layers=args.layers, min_call_mb=args.min_call_mb, rounds=args.rounds,
                      timing=args.timing,
                      rows=[dict(r, config=config_label(r["config"])) if r.get("config") else r for r in rows],
                      skipped=skipped,
                      baselines_missing=missing, baseline_errors=baseline_errors)
        result["runs"] = [dict(run=1, date=result["date"], copy_bw_tbs=result["copy_bw_tbs"], timing=args.timing)]
        if old is not None:
            runs = old.get("runs") or [dict(run=1, date=old["date"], copy_bw_tbs=old["copy_bw_tbs"])]
            run = max(r["run"] for r in runs) + 1
            new = [dict(r, run=run) for r in result["rows"]]
            fresh = {(r["format"], r["shape"], r["m"]) for r in new if r["method"] != "bf16"}
            kept = [r for r in old["rows"] if r["method"] == "bf16" or (r["format"], r["shape"], r["m"]) not in fresh]
            result["rows"] = kept + new
            result["runs"] = runs + [dict(run=run, date=result["date"], copy_bw_tbs=result["copy_bw_tbs"],
                                                  timing=args.timing)]
            result["skipped"] = old.get("skipped", []) + skipped
        result["summary"] = summarize(result["rows"])  # of this run's rows, or of the merged file's
        os.makedirs(args.out, exist_ok=True)
        base = os.path.join(args.out, f"qmatmul_{gpu_name()}")
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown(result))
        if final:
            print(markdown(result))

    for shape, m in order:
        k, n = SHAPES[shape]
        if time.time() - start > args.budget_s:
            skipped.append(f"{shape} M={m}")
            continue
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
        layers = layers_for(k, n, args.layers, args.min_call_mb)
        keys = jax.random.split(jax.random.key(hash((shape, m)) % 2**31), layers)
        # Every op of this (shape, M) is compiled first, then timed round after round (--rounds): each row's time is
        # the median of its rounds, so one slow or lucky repeat of a ~10 us op does not decide it.
        ops = []  # (row fields, measure, weights)
        ws = [random_weight(kk, "bf16", k, n) for kk in keys]
        cs, measure = layer_timer(bf16_dot, x, ws, timing=args.timing)
        ops.append((dict(format="bf16", method="bf16", bytes=weight_bytes(ws[0]), compile_s=cs), measure, ws))
        for fmt in formats + (args.extra_formats.split(",") if m == 1 and args.extra_formats else []):
            ws = [random_weight(kk, fmt, k, n) for kk in keys]
            cfg = qmatmul_tiles.lookup(gpu_name(), ws[0].name, m, k, n)
            for method, fn in (("ours", ours(fmt)), ("xla", xla)):
                try:
                    cs, measure = layer_timer(fn, x, ws, timing=args.timing)
                except Exception as e:  # report, keep going
                    print(f"FAILED {method} {fmt} {shape} M={m}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                ops.append((dict(format=fmt, method=method, bytes=weight_bytes(ws[0]), compile_s=cs,
                                 config=(cfg.to_json() if method == "ours" else None)), measure, ws))
            ref = quantized_matmul_reference(x, ws[0], out_dtype=jnp.float32) if baselines else None
            for name in baselines:  # the same integers and scales in the baseline's own format, checked first
                convert, fn = qmatmul_baselines.baseline(name)
                try:
                    operands = [convert(w) for w in ws]
                    if operands[0] is None:
                        continue
                    err = float(jnp.linalg.norm(fn(x, operands[0]).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                    if not err < 1e-2:
                        raise ValueError(f"relative error {err:.3g} against the reference (allowed 1e-2)")
                    cs, measure = layer_timer(fn, x, operands, timing=args.timing)
                except Exception as e:  # report, keep going
                    print(f"FAILED {name} {fmt} {shape} M={m}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    why, msg = baseline_errors.setdefault(name, {}), f"{type(e).__name__}: {str(e)[:120]}"
                    why[msg] = why.get(msg, 0) + 1
                    continue
                ops.append((dict(format=fmt, method=name, bytes=weight_bytes(ws[0]), compile_s=cs, rel_err=err),
                            measure, operands))
        times = [[] for _ in ops]
        for _ in range(args.rounds):
            for t, (_, measure, _) in zip(times, ops):
                t.append(measure())
        for t, (fields, _, _) in zip(times, ops):
            us = statistics.median(t)
            rows.append(dict(shape=shape, m=m, k=k, n=n, us=us * 1e6, frac_bw=fields["bytes"] / us / bw,
                             layers=layers, **fields, **({"us_rounds": [v * 1e6 for v in t]} if len(t) > 1 else {})))
        del ops, ws
        done = [r for r in rows if r["shape"] == shape and r["m"] == m]
        print(" ".join(f"{r['format']}/{r['method']}={r['us']:.1f}us" for r in done), f"[{shape} M={m}]",
              f"t={time.time() - start:.0f}s", flush=True)
        write(final=False)
    write(final=True)


if __name__ == "__main__":
    main()
