"""Remat policies on GLM-4-9B-shaped layers: activation memory from the compiled executable, FLOPs added,
and (on a GPU) measured peak memory and step time.

    python experiments/remat_memory.py                 # CPU: AOT compile only, nothing allocated
    python experiments/remat_memory.py --gpu           # also allocate, run and time (GPU)

What is compiled: the backward pass of the decoder-layer stack alone (``ScannedGLM.layer_stack``, a scan over
stacked layers, bfloat16, batch 1) -- ``grad`` of ``sum(layer_stack(h) * cotangent)`` w.r.t. the layer weights
and ``h``. The embedding and the 151552-word LM head are left out: their logits would dwarf the layers and are
the same under every policy. Per-layer activation bytes = (temp(L=4) - temp(L=2)) / 2, so one layer's
recompute working set (present once, not per layer) cancels; the per-layer temp that XLA spends on
weight-sized buffers (the scan's weight-gradient and weight-slice buffers, measured the same way at
T=16) is subtracted. The cost of recomputation on CPU is the extra FLOPs of the
compiled step (``cost_analysis``) relative to ``none``; on the GPU it is the measured step time. (XLA's GPU
``cost_analysis`` of these compiles, autotuning off, counts GEMMs differently per emitter -- e.g. 11% fewer
FLOPs for dots_saveable than for none at T=8192 -- so no FLOPs ratio is computed or tabled there.)

On the GPU each (policy, seq) step is allocated, run and timed in a fresh process (a hidden ``--worker``), so
its peak (``peak_bytes_in_use``, a high-water mark of the whole process that never resets) is its own. Each
worker runs twice over a persistent compilation cache (``bench_common.spawn_worker(warm_compile_cache=True)``):
a warm-up pass compiles, and the measured pass loads that executable, so its peak leaves out the device
memory XLA's autotuner takes while it compiles (which had been every policy's peak at T=8192). The workers
run first, then this process compiles (AOT) as on CPU, with autotuning off (``bench_common.NO_AUTOTUNE``):
memory_analysis and cost_analysis do not depend on the kernel the autotuner picks (at most a GEMM's
workspace does, and it cancels in the per-layer difference), while its profiling of the T=8192 ``none``
step ran out of device memory ("All configs failed during profiling") and costs seconds per compile.

Seed claim checked: "gradient checkpointing: activations recomputed instead of stored" -- the table shows
how much memory each policy stores per layer and what recomputation it costs.

Writes experiments/results/remat_memory[_<gpu>].json and .md, e.g. remat_memory_h100 (+ .png if matplotlib is
installed). ``--replot`` (hidden) rewrites the .md and .png of an existing ``<out>/<--name>.json`` (default
remat_memory_h100) without compiling or running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from experiments import bench_common  # noqa: E402

from autoglm_jax.config import GLMConfig  # noqa: E402
from autoglm_jax.model.remat import REMAT_POLICIES, offload_supported  # noqa: E402
from autoglm_jax.train import TrainConfig  # noqa: E402
from autoglm_jax.train.memory_estimate import estimate_training_memory  # noqa: E402
from autoglm_jax.train.scanned import ScannedGLM  # noqa: E402

RESULTS = REPO / "experiments" / "results"
SEQS = (2048, 4096, 8192)
TINY_SEQ = 16  # activations negligible: what still grows per layer is weight-sized (gradient buffers, slices)
GB = 1 << 30
MEASURED_LAYERS = 4
WORKER_TIMEOUT_S = 300


def layer_grad_fn(fwd: ScannedGLM):
    def loss(layers, h, cot):
        t = h.shape[1]
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), h.shape[:2])
        out = fwd.layer_stack(layers, h, positions)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def abstract_inputs(cfg: GLMConfig, num_layers: int, seq: int, dtype=jnp.bfloat16):
    fwd = ScannedGLM.create(cfg.replace(num_layers=num_layers), dtype="bfloat16")
    layers = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), fwd.abstract_params()["layers"])
    h = jax.ShapeDtypeStruct((1, seq, cfg.hidden_size), dtype)
    return layers, h, h


def compile_policy(cfg, policy, num_layers, seq):
    fwd = ScannedGLM.create(cfg.replace(num_layers=num_layers), dtype="bfloat16", remat=policy)
    compiled = layer_grad_fn(fwd).lower(*abstract_inputs(cfg, num_layers, seq)).compile()
    ma = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"temp": int(ma.temp_size_in_bytes), "argument": int(ma.argument_size_in_bytes),
            "output": int(ma.output_size_in_bytes),
            "host_temp": int(getattr(ma, "host_temp_size_in_bytes", 0)),
            "flops": float(cost.get("flops", float("nan")))}


def measure_gpu(cfg, policy, num_layers, seq, reps=5):
    """Allocates real inputs, runs the step: peak bytes (None without memory statistics), median seconds.

    Run it in a fresh process (``measure_in_worker``): the peak is the whole process's high-water mark."""
    dev = jax.devices()[0]
    fwd = ScannedGLM.create(cfg.replace(num_layers=num_layers), dtype="bfloat16", remat=policy)
    f = layer_grad_fn(fwd)
    layers_a, h_a, _ = abstract_inputs(cfg, num_layers, seq)
    key = jax.random.key(0)
    layers = jax.tree.map(lambda a: (0.02 * jax.random.normal(key, a.shape)).astype(a.dtype), layers_a)
    h = jax.random.normal(jax.random.key(1), h_a.shape).astype(h_a.dtype)
    cot = jax.random.normal(jax.random.key(2), h_a.shape).astype(h_a.dtype)
    jax.block_until_ready(f(layers, h, cot))
    base = (dev.memory_stats() or {}).get("bytes_in_use")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(layers, h, cot))
        times.append(time.perf_counter() - t0)
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use")
    del layers, h, cot
    return {"peak_bytes": peak, "bytes_in_use_before": base, "step_s": float(np.median(times))}


def measure_in_worker(preset: str, policy: str, seq: int, *, env: dict | None = None) -> dict:
    """``measure_gpu`` of ``MEASURED_LAYERS`` layers in a fresh process, measured in its second, warm-cache pass;
    its fields as ``gpu_*`` (or ``gpu_error``); ``gpu_compile_cache_warm``: that pass compiled nothing."""
    argv = ["--worker", policy, "--preset", preset, "--seqs", str(seq)]
    res = bench_common.spawn_worker(__file__, argv, env=env, timeout_s=WORKER_TIMEOUT_S, warm_compile_cache=True)
    return {"gpu_error": res["error"]} if "error" in res else {f"gpu_{k}": v for k, v in res.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="also run and time on the GPU (needs one)")
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--preset", default="glm-4-9b", help="model preset whose layer shapes are compiled")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one policy's GPU step at --seqs, in a fresh process
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help=argparse.SUPPRESS)  # .md + .png from <out>/<name>.json
    ap.add_argument("--name", default="remat_memory_h100", help=argparse.SUPPRESS)  # which result --replot reads
    args = ap.parse_args(argv)
    if args.replot:
        bench_common.rewrite_doc(args.out, args.name, markdown, plot)
        return
    seqs = [int(s) for s in args.seqs.split(",")]
    cfg = GLMConfig.from_preset(args.preset)
    if args.worker:
        bench_common.write_worker_result(lambda: measure_gpu(cfg, args.worker, MEASURED_LAYERS, seqs[0]),
                                         args.worker_out)
        return
    worker_env = bench_common.env_for_workers() if args.gpu else None  # before jax touches the device here
    os.environ["XLA_FLAGS"] = bench_common.with_xla_flags(os.environ, bench_common.NO_AUTOTUNE)  # this process's AOT
    backend = jax.default_backend()
    offload_ok, offload_why = offload_supported()
    measured = {}  # (seq, policy) -> gpu_* fields; measured before this process compiles on the device
    if args.gpu and backend == "gpu":
        for seq in seqs:
            for policy in (p for p in REMAT_POLICIES if p != "offload" or offload_ok):
                measured[seq, policy] = measure_in_worker(args.preset, policy, seq, env=worker_env)
                print(seq, policy, json.dumps(measured[seq, policy]), flush=True)
    rows, weight_overhead = [], {}
    for seq in seqs:
        for policy in REMAT_POLICIES:
            row = {"seq_len": seq, "policy": policy, **measured.get((seq, policy), {})}
            try:
                c2, c4 = compile_policy(cfg, policy, 2, seq), compile_policy(cfg, policy, 4, seq)
            except Exception as e:  # noqa: BLE001 -- recorded, the table says so
                row["error"] = bench_common.error_text(e)
                rows.append(row)
                print(seq, policy, row["error"], flush=True)
                continue
            if policy not in weight_overhead:  # per-layer temp that scales with the weights, not with T
                w2, w4 = compile_policy(cfg, policy, 2, TINY_SEQ), compile_policy(cfg, policy, 4, TINY_SEQ)
                weight_overhead[policy] = (w4["temp"] - w2["temp"]) / 2
            per_layer = (c4["temp"] - c2["temp"]) / 2 - weight_overhead[policy]
            est = estimate_training_memory(cfg.replace(num_layers=4),
                                           TrainConfig(seq_len=seq, batch_size=1, remat=policy, dtype="bfloat16"))
            row.update({
                "temp_L2": c2["temp"], "temp_L4": c4["temp"], "host_temp_L4": c4["host_temp"],
                "weight_proportional_temp_per_layer": weight_overhead[policy],
                "activation_bytes_per_layer": per_layer,
                "estimator_saved_bytes_per_layer": est.saved_per_layer,
                "activation_gib_40_layers": 40 * per_layer / GB,
                "flops_L4": c4["flops"],
                "offload_note": None if policy != "offload" or offload_ok else
                f"compiled on {backend}: {offload_why}; nothing moves to host here",
            })
            rows.append(row)
            print(json.dumps(row), flush=True)
    for seq in seqs:
        at_seq = [r for r in rows if r["seq_len"] == seq]
        base = next((r for r in at_seq if r["policy"] == "none"), {})
        for r in at_seq:
            if base and "error" not in base and "error" not in r:
                r["memory_saved_vs_none"] = 1 - r["activation_bytes_per_layer"] / base["activation_bytes_per_layer"]
                if backend == "cpu":  # the GPU's cost_analysis is not comparable across policies (docstring)
                    r["flops_added_vs_none"] = r["flops_L4"] / base["flops_L4"] - 1
            if "gpu_step_s" in r and "gpu_step_s" in base:
                r["gpu_time_added_vs_none"] = r["gpu_step_s"] / base["gpu_step_s"] - 1
                if r["gpu_peak_bytes"] and base["gpu_peak_bytes"]:
                    r["gpu_peak_saved_vs_none"] = 1 - r["gpu_peak_bytes"] / base["gpu_peak_bytes"]
    device = jax.devices()[0].device_kind
    name = "remat_memory" + ("" if backend == "cpu" else "_" + bench_common.gpu_tag())
    doc = {"device": f"{backend}: {device}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "model": f"{args.preset} layer shapes (D={cfg.hidden_size}, F={cfg.intermediate_size}, N={cfg.num_heads}, "
                 f"K={cfg.num_kv_heads}, H={cfg.head_dim}), bfloat16, batch 1",
        "rows": rows, "summary": summarize(rows)}
    bench_common.write_doc(args.out, name, doc, markdown(doc), plot=lambda path: plot(path, doc))


def summarize(rows):
    """CPU: per length, the policy saving most memory per FLOP added; GPU: the fastest and the smallest-peak
    measured policy per length."""
    ok = [r for r in rows if "error" not in r]
    best, fastest, smallest = {}, {}, {}
    for seq in sorted({r["seq_len"] for r in ok}):
        cands = [r for r in ok if r["seq_len"] == seq and r["policy"] != "none" and "flops_added_vs_none" in r]
        if cands:
            top = max(cands, key=lambda r: r["memory_saved_vs_none"] / max(r["flops_added_vs_none"], 1e-3))
            best[str(seq)] = top["policy"]
        timed = [r for r in ok if r["seq_len"] == seq and "gpu_step_s" in r]
        if timed:
            fastest[str(seq)] = min(timed, key=lambda r: r["gpu_step_s"])["policy"]
            smallest[str(seq)] = min(timed, key=lambda r: r.get("gpu_peak_bytes") or float("inf"))["policy"]
    if fastest:
        return {"fastest_on_gpu": fastest, "smallest_gpu_peak": smallest}
    return {"best_saving_per_flop_added": best}


def markdown(doc) -> str:
    gpu = any("gpu_step_s" in r for r in doc["rows"])
    head = ["seq", "policy", "act. MiB/layer (XLA)", "estimator MiB/layer", "GiB at 40 layers", "memory saved"] + (
        ["GPU peak GiB", "GPU peak saved vs none", "GPU ms", "GPU time added"] if gpu else ["FLOPs added"])
    cost = ("No FLOPs column: XLA's GPU `cost_analysis()` of these compiles (autotuning off) counts GEMMs "
            "differently per emitter, so its FLOPs do not compare across policies; the cost of recomputing is "
            "the measured 'GPU time added' (FLOPs from a CPU AOT compile: remat_memory.md)." if gpu else
            "FLOPs from `compiled.cost_analysis()` of the 4-layer backward.")
    lines = [f"# Remat policies on GLM-4-9B-shaped layers ({doc['device']}, {doc['date']})", "",
             doc["model"] + ". Activation bytes from `compiled.memory_analysis()` (temp), per layer = "
             "(temp(L=4) - temp(L=2)) / 2 minus the same at T=16 (weight-sized buffers); "
             "'GiB at 40 layers' = 40 x that (stored activations only). " + cost, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['policy']} | error: {r['error'][:80]} |")
            continue
        cells = [str(r["seq_len"]), r["policy"], f"{r['activation_bytes_per_layer'] / 2**20:.0f}",
                 f"{r['estimator_saved_bytes_per_layer'] / 2**20:.0f}", f"{r['activation_gib_40_layers']:.1f}",
                 percent(r.get("memory_saved_vs_none"), "{:.0f}%")]
        if not gpu:
            cells.append(percent(r.get("flops_added_vs_none"), "{:+.0f}%"))
        else:
            cells += [f"{r['gpu_peak_bytes'] / GB:.1f}" if r.get("gpu_peak_bytes") is not None else "-",
                      percent(r.get("gpu_peak_saved_vs_none"), "{:.0f}%"),
                      f"{1e3 * r['gpu_step_s']:.1f}" if "gpu_step_s" in r else r.get("gpu_error", "-")[:40],
                      percent(r.get("gpu_time_added_vs_none"), "{:+.0f}%")]
        lines.append("| " + " | ".join(cells) + " |")
    if gpu:
        measured = [r for r in doc["rows"] if "gpu_step_s" in r]
        lines += ["", f"GPU columns: {MEASURED_LAYERS} layers, each (seq, policy) run in its own process, so its peak "
                  "(`peak_bytes_in_use`) is its own. Each process ran twice over a persistent compilation cache: "
                  "peaks and times are from the second, warm-cache pass, which loads the executable instead of "
                  "compiling it, so XLA's autotuner allocations are not in the peak "
                  f"({sum(bool(r.get('gpu_compile_cache_warm')) for r in measured)} of {len(measured)} measured passes "
                  "loaded every executable from the cache). '-' where the `none` baseline at that length failed."]
    full = min((r for r in doc["rows"] if r["policy"] == "full" and "error" not in r), key=lambda r: r["seq_len"],
               default=None)
    if doc["device"].startswith("cpu") and full:
        lines += ["", "On CPU, XLA computes bfloat16 elementwise work in float32 (its bf16 normalisation), so tensors it "
                  "stores can be float32-sized: XLA's per-layer figures for the remat policies can be twice the "
                  f"estimator's bfloat16 count (full: the layer input, {full['estimator_saved_bytes_per_layer'] / 2**20:.0f}"
                  f" MiB at T={full['seq_len']} in bf16, is kept as {full['activation_bytes_per_layer'] / 2**20:.0f} MiB). "
                  "The GPU run (`--gpu`) measures bf16 as stored there."]
    notes = [r["offload_note"] for r in doc["rows"] if r.get("offload_note")]
    if notes:
        lines += ["", f"offload: {notes[0]}."]
    lines += ["", seed_note(doc["rows"], gpu), ""]
    return "\n".join(lines)


def seed_note(rows, gpu: bool) -> str:
    """The seed-claim paragraph, every number taken from ``rows``."""
    ok = [r for r in rows if "error" not in r]
    by = lambda policy: sorted((r for r in ok if r["policy"] == policy), key=lambda r: r["seq_len"])
    mib = lambda rs, key: " / ".join(f"{r[key] / 2**20:.0f}" for r in rs)
    seqs = lambda rs: " / ".join(str(r["seq_len"]) for r in rs)
    cost_key, cost_name = (("gpu_time_added_vs_none", "measured GPU step time vs `none`") if gpu else
                           ("flops_added_vs_none", "FLOPs vs `none`"))

    def span(rs, key, fmt="{:+.0f}%", scale=100):
        vals = [scale * r[key] for r in rs if r.get(key) is not None]
        if not vals:
            return "n/a"
        lo, hi = fmt.format(round(min(vals))), fmt.format(round(max(vals)))  # round: no "-0%"
        trend = ", growing with T" if len(vals) > 2 and all(b > a for a, b in zip(vals, vals[1:])) else ""
        return (lo if lo == hi else f"{lo} to {hi}") + trend

    full, dots, none = by("full"), by("dots_saveable"), by("none")
    remat = [r for r in ok if r["policy"] != "none" and "memory_saved_vs_none" in r]
    saves = [r["memory_saved_vs_none"] for r in remat]
    verdict = ("true as stated" if saves and min(saves) > 0.5 else "not borne out here") + (
        f": every remat policy stores at most {100 * (1 - min(saves)):.0f}% of `none`'s activation bytes per layer"
        if saves else "")
    text = f"Seed claim \"gradient checkpointing: activations recomputed instead of stored\": {verdict}."
    if full:
        text += (f" `full` stores {mib(full, 'activation_bytes_per_layer')} MiB per layer at T = {seqs(full)} "
                 f"(the estimator's bf16 layer input: {mib(full, 'estimator_saved_bytes_per_layer')} MiB"
                 + ("; a negative figure is within the noise of the L=4 minus L=2 difference"
                    if min(r["activation_bytes_per_layer"] for r in full) < 0 else "") +
                 f"); {cost_name}: {span(full, cost_key)}" + ("" if gpu else " (one more forward pass: the bound is "
                                                              "+33% of a fwd+bwd step)") + ".")
    if dots:
        stored = [dict(r, kept=1 - r["memory_saved_vs_none"]) for r in dots if "memory_saved_vs_none" in r]
        text += (f" `dots_saveable` keeps the big matmul outputs, stores {span(stored, 'kept', '{:.0f}%')} of "
                 f"`none`'s bytes and recomputes only elementwise ops and the attention einsums ({cost_name}: "
                 f"{span(dots, cost_key)}).")
    if gpu:
        text += (f" Measured GPU peak ({MEASURED_LAYERS} layers) saved vs `none`: {span(remat, 'gpu_peak_saved_vs_none', '{:.0f}%')}"
                 "; step times compare only where `none` ran, and a negative one is faster than `none`.")
    if len(none) >= 2 and none[0]["activation_bytes_per_layer"] > 0:
        a, b = none[0], none[-1]
        k = np.log(b["activation_bytes_per_layer"] / a["activation_bytes_per_layer"]) / np.log(b["seq_len"] / a["seq_len"])
        text += (f" Without remat, stored activations grow about as T^{k:.1f} from {a['seq_len']} to {b['seq_len']} "
                 "(the [N, T, T] float32 attention probabilities of this dense path dominate at long T).")
    return text


def percent(x, fmt: str) -> str:
    """``fmt`` of 100 * x, or '-' where there is nothing to compare with (e.g. the `none` baseline failed)."""
    return "-" if x is None else fmt.format(round(100 * x))  # round: no "-0%"


def plot(path: Path, doc) -> None:
    """(a) stored activation MiB per layer vs T (log scale; a non-positive difference is left out);
    (b) GPU: measured peak GiB, CPU: FLOPs added vs none, per policy vs T."""
    plt = bench_common.pyplot_or_none()
    if plt is None:
        return
    rows = [r for r in doc["rows"] if "error" not in r]
    gpu = any("gpu_step_s" in r for r in rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, policy in enumerate(REMAT_POLICIES):  # own marker and dash each: identical policies overlap
        mine = [r for r in rows if r["policy"] == policy]
        style = {"color": f"C{i}", "marker": "os^Dv"[i % 5], "linestyle": ("-", "--", ":")[i % 3]}
        pts = [(r["seq_len"], r["activation_bytes_per_layer"] / 2**20) for r in mine if r["activation_bytes_per_layer"] > 0]
        if pts:
            a.plot(*zip(*pts), label=policy, **style)
        if gpu:
            pts = [(r["seq_len"], r["gpu_peak_bytes"] / GB) for r in mine if r.get("gpu_peak_bytes")]
            failed = [r["seq_len"] for r in mine if "gpu_error" in r]
            if failed:
                b.plot(failed, [0] * len(failed), "x", color=f"C{i}", markersize=9, label=f"{policy}: failed")
        else:
            pts = [(r["seq_len"], 100 * r["flops_added_vs_none"]) for r in mine if "flops_added_vs_none" in r]
        if pts:
            b.plot(*zip(*pts), label=policy, **style)
    seqs = sorted({r["seq_len"] for r in rows})
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(t) for t in seqs])
        ax.minorticks_off()
        ax.set_xlabel("sequence length (batch 1)")
        ax.legend(fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("stored activation MiB per layer (XLA temp)")
    a.set_title("(a) activations stored per layer (a figure <= 0 is left out)")
    if gpu:
        b.set_ylabel(f"measured peak GiB ({MEASURED_LAYERS} layers)")
        b.set_title("(b) GPU peak memory (x at 0: the step failed)")
    else:
        b.set_ylabel("FLOPs added vs none (%)")
        b.set_title("(b) recomputation cost (cost_analysis)")
    fig.suptitle(f"Remat policies, {doc['device']} ({doc['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
