"""Training throughput on one GPU: tokens/s and model FLOPs utilisation (MFU) of the full train step
(AdamW, bfloat16 compute, float32 params and moments) for a 1B-class GLM, per remat policy, with peak memory;
and the largest sequence length whose step fits in device memory, per policy (AOT ``memory_analysis``).

    pip install --no-deps -e . && python experiments/training_gpu.py --out experiments/results

Sized to finish in about 5 minutes on one H100: five timed policies of ~35 s each, then the sequence-length
searches side by side, each cut off at ``--budget-s`` (what it tried by then is kept; the table says whether
it completed). Writes training_<gpu>.json, .md and .png (e.g. training_h100; the plot needs matplotlib).

Each policy's timed steps run in a fresh process (a hidden ``--worker``), so its measured peak
(``peak_bytes_in_use``, a high-water mark of the whole process that never resets) is its own, and a policy
that runs out of memory leaves nothing behind for the next. The worker runs twice over a persistent
compilation cache (``bench_common.spawn_worker(warm_compile_cache=True)``): the measured pass loads the
executable compiled by the first, so its peak leaves out the device memory XLA's autotuner takes while it
compiles. ``--tiny`` (hidden) runs the same on CPU with the tiny preset. ``--replot`` (hidden) rewrites the .md
and .png of an existing ``<out>/<--name>.json`` (default training_h100) without any device work.

The sequence-length search (batch 1) compiles only (AOT) and runs one process per policy (a hidden
``--search-worker``), all at once, after the timed workers: from 2048 it doubles while the step fits (up to
262144), or halves while it does not (down to 256); it fits when the compiled total is within this device's
allocator limit (``bytes_limit``), which the workers are given. They compile with
``--xla_gpu_autotune_level=0`` and without preallocation: the autotuner only chooses among kernels for
the same fusions, so the buffers the step keeps alive -- what decides whether it fits -- do not depend on
its choice (at most a GEMM's scratch workspace does, MiBs), while autotuning a 1.3 B model takes 20-40 s
per compile.

MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s of the device. Model FLOPs per token =
6 * (matmul parameters incl. LM head) + 12 * L * N * H * T (attention scores and values; no causal discount);
recomputation under remat is not counted (it is work, not model FLOPs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
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
from autoglm_jax.train.loop import abstract_train_state, build  # noqa: E402
from autoglm_jax.train.memory_estimate import compiled_memory, estimate_training_memory  # noqa: E402
from autoglm_jax.train.state import init_train_state  # noqa: E402

RESULTS = REPO / "experiments" / "results"
# 1.3 B parameters (0.7 B in the layers): GLM-4 layer structure at D=2048.
GLM_1B = GLMConfig.from_preset("glm-4-9b", hidden_size=2048, intermediate_size=5632, num_layers=16,
                               num_heads=16, num_kv_heads=2, head_dim=128, max_position_embeddings=131072)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM
WORKER_TIMEOUT_S = 300
SEARCH_START, SEARCH_MIN, SEARCH_MAX = 2048, 256, 262144
TINY = GLMConfig.from_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                              head_dim=16)  # --tiny: a CPU smoke of the whole path in seconds


def model_config(tiny: bool) -> GLMConfig:
    return TINY if tiny else GLM_1B


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def model_flops_per_token(cfg: GLMConfig, seq: int) -> float:
    d = cfg.hidden_size
    matmul = cfg.num_layers * (d * cfg.qkv_size + cfg.num_heads * cfg.head_dim * d + 3 * d * cfg.intermediate_size)
    matmul += d * cfg.vocab_size
    return 6 * matmul + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def policies() -> list[str]:
    ok, _ = offload_supported()
    return [p for p in REMAT_POLICIES if p != "offload" or ok]


def time_policy(cfg: GLMConfig, policy: str, batch: int, seq: int, steps: int) -> dict:
    """Compiles and times the train step; run it in a fresh process (``measure_in_worker``) for its peak."""
    dev = jax.devices()[0]
    tc = TrainConfig(seq_len=seq, batch_size=batch, remat=policy, dtype="bfloat16", total_steps=100,
                     warmup_steps=1)
    fwd, tx, step = build(cfg, tc)
    t0 = time.perf_counter()
    tokens_spec = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    compiled_mem = compiled_memory(step.lower(abstract_train_state(fwd, tx, 0), tokens_spec,
                                              tokens_spec.update(dtype=jnp.float32)).compile())
    state = init_train_state(fwd.init_params(0), tx, 0)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32),
                np.ones((batch, seq + 1), np.float32)) for _ in range(2)]
    state, m = step(state, *batches[0])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t1 = time.perf_counter()
        state, m = step(state, *batches[i % 2])
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t1)
    stats = dev.memory_stats() or {}
    step_s = float(np.median(times))
    tok_s = batch * seq / step_s
    peak = peak_flops(dev.device_kind)
    est = estimate_training_memory(cfg, tc)
    del state
    return {"policy": policy, "batch": batch, "seq_len": seq, "step_s": step_s, "tokens_per_s": tok_s,
            "mfu": (tok_s * model_flops_per_token(cfg, seq) / peak) if peak else None,
            "peak_bytes": stats.get("peak_bytes_in_use"), "compiled_total_bytes": compiled_mem["total"],
            "estimated_total_bytes": est.total, "compile_and_first_step_s": compile_s, "loss": float(m["loss"])}


def measure_in_worker(policy: str, batch: int, seq: int, steps: int, *, tiny: bool = False,
                      env: dict | None = None) -> dict:
    """``time_policy`` in a fresh process (its peak memory is its own); a row with "error" if it failed."""
    argv = ["--worker", policy, "--batch", str(batch), "--seq", str(seq), "--steps", str(steps)]
    res = bench_common.spawn_worker(__file__, argv + (["--tiny"] if tiny else []), env=env,
                                    timeout_s=WORKER_TIMEOUT_S, warm_compile_cache=True)
    return res if "error" not in res else {"policy": policy, "batch": batch, "seq_len": seq, **res}


def fits(cfg: GLMConfig, policy: str, seq: int, limit: int) -> tuple[bool, int]:
    tc = TrainConfig(seq_len=seq, batch_size=1, remat=policy, dtype="bfloat16", total_steps=10, warmup_steps=1)
    fwd, tx, step = build(cfg, tc)
    spec = jax.ShapeDtypeStruct((1, seq + 1), jnp.int32)
    try:
        mem = compiled_memory(step.lower(abstract_train_state(fwd, tx, 0), spec,
                                         spec.update(dtype=jnp.float32)).compile())
    except Exception as e:  # noqa: BLE001 -- XLA refuses to compile what cannot fit
        if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
            return False, -1
        raise
    return mem["total"] <= limit, mem["total"]


def search_max_seq(fits_at, progress=None) -> dict:
    """The largest power-of-two length for which ``fits_at(seq) -> (fits, compiled_total_bytes)`` holds.

    From ``SEARCH_START`` it doubles while the step fits, or halves while it does not, within
    [``SEARCH_MIN``, ``SEARCH_MAX``]. Every try is recorded; ``complete`` once both a fitting and a failing
    length were found or a bound was reached. ``progress`` gets the result so far after each try.
    """
    tried = []

    def result(complete: bool) -> dict:
        fitting = [t["seq_len"] for t in tried if t["fits"]]
        return {"largest_fitting_power_of_two": max(fitting, default=None), "tried": tried, "complete": complete}

    seq, up = SEARCH_START, None
    while SEARCH_MIN <= seq <= SEARCH_MAX:
        t0 = time.perf_counter()
        try:
            ok, total = fits_at(seq)
        except Exception as e:  # noqa: BLE001 -- recorded with what was found so far
            return {**result(False), "error": bench_common.error_text(e)}
        tried.append({"seq_len": seq, "fits": ok, "compiled_total_bytes": total,
                      "compile_s": time.perf_counter() - t0})
        if up is None:
            up = ok
        elif ok != up:
            return result(True)  # crossed from fitting to failing (or back)
        if progress is not None:
            progress(result(False))
        seq = seq * 2 if up else seq // 2
    return result(True)  # a bound was reached


def search_in_worker(cfg: GLMConfig, policy: str, limit: int, out_path: str) -> None:
    """The ``--search-worker`` side: ``search_max_seq`` for one policy; each try is written to ``out_path``
    at once, so a worker cut off at ``--budget-s`` still reports what it found."""
    def progress(res):
        Path(out_path).write_text(json.dumps(res))
    bench_common.write_worker_result(lambda: search_max_seq(lambda seq: fits(cfg, policy, seq, limit), progress),
                                     out_path)


def search_all(policies_: list[str], limit: int, budget_s: float, *, tiny: bool, env: dict) -> dict:
    """One ``--search-worker`` per policy, all at once, each cut off after ``budget_s``: policy -> result."""
    env = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "false",  # several share the device; they only compile
           "XLA_FLAGS": bench_common.with_xla_flags(env, bench_common.NO_AUTOTUNE)}

    def one(policy):
        argv = ["--search-worker", policy, "--limit-bytes", str(limit)] + (["--tiny"] if tiny else [])
        return bench_common.spawn_worker(__file__, argv, env=env, timeout_s=budget_s)

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(policies_)) as pool:
        return dict(zip(policies_, pool.map(one, policies_)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="seconds each policy's sequence-length search may take (0: no search)")
    ap.add_argument("--policies", help="comma-separated remat policies (default: all this device supports)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CPU smoke: tiny preset, no GPU
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one policy's timing, in a fresh process
    ap.add_argument("--search-worker", help=argparse.SUPPRESS)  # one policy's max-seq search, fresh process
    ap.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)  # the parent's allocator limit
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--replot", action="store_true", help=argparse.SUPPRESS)  # .md + .png from <out>/<name>.json
    ap.add_argument("--name", default="training_h100", help=argparse.SUPPRESS)  # which result --replot reads
    args = ap.parse_args(argv)
    if args.replot:
        bench_common.rewrite_doc(args.out, args.name, markdown, plot)
        return
    cfg = model_config(args.tiny)
    if args.search_worker:
        search_in_worker(cfg, args.search_worker, args.limit_bytes, args.worker_out)
        return
    if args.worker:
        bench_common.write_worker_result(lambda: time_policy(cfg, args.worker, args.batch, args.seq, args.steps),
                                         args.worker_out)
        return
    chosen = args.policies.split(",") if args.policies else None
    if chosen and (unknown := [p for p in chosen if p not in REMAT_POLICIES]):
        ap.error(f"unknown remat policies {unknown}; known: {', '.join(REMAT_POLICIES)}")
    worker_env = bench_common.env_for_workers()  # before jax touches the device here
    if jax.default_backend() != "gpu" and not args.tiny:
        sys.exit(f"training_gpu.py needs a GPU (jax backend is {jax.default_backend()!r}); nothing written")
    start = time.perf_counter()
    chosen = chosen or policies()
    rows = []
    for policy in chosen:
        rows.append(measure_in_worker(policy, args.batch, args.seq, args.steps, tiny=args.tiny, env=worker_env))
        print(json.dumps(rows[-1]), flush=True)
    timed = [r for r in rows if "error" not in r]
    best = max(timed, key=lambda r: r["tokens_per_s"])["policy"] if timed else None
    dev = jax.devices()[0]
    limit = int((dev.memory_stats() or {}).get("bytes_limit", 0)) or int(75 * 2**30)
    max_seq = search_all(chosen, limit, args.budget_s, tiny=args.tiny, env=worker_env) if args.budget_s > 0 else {}
    for policy, res in max_seq.items():
        print(policy, json.dumps(res), flush=True)
    kind = dev.device_kind
    name = "training_" + bench_common.gpu_tag()
    doc = {"device": f"{dev.platform}: {kind}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"jax": jax.__version__, "python": platform.python_version()},
           "model": {**cfg.to_hf_dict(), "num_params": cfg.num_params()},
           "rows": rows, "max_seq_len_batch1": max_seq, "memory_limit_bytes": limit, "search_budget_s": args.budget_s,
           "summary": {"best_policy": best, "best_tokens_per_s": max((r["tokens_per_s"] for r in timed), default=None),
                       "best_mfu": next((r["mfu"] for r in timed if r["policy"] == best), None),
                       "peak_flops_assumed": peak_flops(kind), "wall_s": time.perf_counter() - start}}
    bench_common.write_doc(args.out, name, doc, markdown(doc), plot=lambda path: plot(path, doc))


def markdown(doc) -> str:
    lines = [f"# Training step on {doc['device']} ({doc['date']})", "",
             f"GLM, {doc['model']['num_params'] / 1e9:.2f} B parameters, D={doc['model']['hidden_size']}, "
             f"L={doc['model']['num_hidden_layers']}, bfloat16 compute, float32 params + AdamW moments.", "",
             "Each policy ran in its own process, twice: the measured pass loaded the step compiled by the first "
             "from a persistent compilation cache, so its peak is the step's own (no compiling or autotuning): "
             f"{sum(bool(r.get('compile_cache_warm')) for r in doc['rows'])} of {len(doc['rows'])} measured passes "
             "loaded every executable from the cache.", "",
             "| policy | batch x seq | step ms | tokens/s | MFU | peak GiB (measured) | compiled GiB | estimated GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if "error" in r:
            lines.append(f"| {r['policy']} | {r['batch']} x {r['seq_len']} | error: {r['error'][:60]} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        peak = f"{r['peak_bytes'] / 2**30:.1f}" if r["peak_bytes"] is not None else "-"
        lines.append(f"| {r['policy']} | {r['batch']} x {r['seq_len']} | {1e3 * r['step_s']:.0f} | {r['tokens_per_s']:.0f} | "
                     f"{mfu} | {peak} | {r['compiled_total_bytes'] / 2**30:.1f} | "
                     f"{r['estimated_total_bytes'] / 2**30:.1f} |")
    lines += ["", f"Largest power-of-two sequence length (batch 1) whose compiled step fits in "
              f"{doc['memory_limit_bytes'] / 2**30:.1f} GiB (AOT, autotuning off; one process per policy, "
              f"{doc['search_budget_s']:.0f} s each; tries: seq GiB, x = does not fit):", "",
              "| policy | largest seq | tries | search complete |", "|---|---|---|---|"]
    for p, v in doc["max_seq_len_batch1"].items():
        tries = ", ".join(f"{t['seq_len']} {gib(t['compiled_total_bytes'])}" + ("" if t["fits"] else " x")
                          for t in v.get("tried", []))
        done = str(v.get("complete", False)) + (f" ({v['error'][:60]})" if "error" in v else "")
        lines.append(f"| {p} | {v.get('largest_fitting_power_of_two')} | {tries} | {done} |")
    if not doc["max_seq_len_batch1"]:
        lines.append("| (not searched: --budget-s 0) | | | |")
    lines += ["", f"Best policy: {doc['summary']['best_policy']}.", ""]
    return "\n".join(lines)


def gib(nbytes: int) -> str:
    """A compiled total in GiB; 'refused' where XLA would not compile the step (-1: out of memory)."""
    return f"{nbytes / 2**30:.1f}" if nbytes >= 0 else "refused"


def plot(path: Path, doc) -> None:
    """(a) tokens/s (bars) and MFU (labels) per policy at the timed batch x seq, a failed policy marked as
    such; (b) the compiled GiB of every length the batch-1 search tried, per policy, against the limit."""
    plt = bench_common.pyplot_or_none()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = doc["rows"]
    x = np.arange(len(rows))
    tok = [r.get("tokens_per_s") or 0.0 for r in rows]
    a.bar(x, [t / 1e3 for t in tok], color=["lightgray" if "error" in r else "C0" for r in rows])
    top = max(tok, default=0) / 1e3 or 1.0
    for i, r in enumerate(rows):
        if "error" in r:
            oom = "RESOURCE_EXHAUSTED" in r["error"] or "out of memory" in r["error"].lower()
            a.text(i, 0.02 * top, "OOM" if oom else "error", ha="center", va="bottom", color="C3", fontweight="bold")
        else:
            label = f"{100 * r['mfu']:.1f}% MFU" if r.get("mfu") is not None else "MFU -"
            a.text(i, tok[i] / 1e3, label, ha="center", va="bottom", fontsize=8)
    a.set_xticks(x, [r["policy"] for r in rows], rotation=15)
    a.set_ylim(0, 1.15 * top)
    a.set_ylabel("thousand tokens/s")
    shape = f"batch {rows[0]['batch']} x seq {rows[0]['seq_len']}" if rows else ""
    a.set_title(f"(a) train step throughput, {shape}")
    limit = doc["memory_limit_bytes"] / 2**30
    for i, (policy, res) in enumerate(doc["max_seq_len_batch1"].items()):
        tried = sorted((t for t in res.get("tried", []) if t["compiled_total_bytes"] >= 0), key=lambda t: t["seq_len"])
        if not tried:
            continue
        seqs, gib = [t["seq_len"] for t in tried], [t["compiled_total_bytes"] / 2**30 for t in tried]
        b.plot(seqs, gib, color=f"C{i}", label=f"{policy} (max {res.get('largest_fitting_power_of_two')})")
        for s, g, t in zip(seqs, gib, tried):
            b.plot(s, g, "o" if t["fits"] else "x", color=f"C{i}", markersize=7)
    b.axhline(limit, color="k", linestyle="--", linewidth=1, label=f"limit {limit:.1f} GiB")
    if not doc["max_seq_len_batch1"]:
        b.text(0.5, 0.5, "not searched (--budget-s 0)", transform=b.transAxes, ha="center")
    else:
        b.set_xscale("log", base=2)
        ticks = sorted({t["seq_len"] for r in doc["max_seq_len_batch1"].values() for t in r.get("tried", [])})
        b.set_xticks(ticks, [str(t) for t in ticks])
        b.minorticks_off()
    b.set_xlabel("sequence length (batch 1); o fits, x does not")
    b.set_ylabel("compiled step GiB (AOT)")
    b.set_title("(b) largest-length search per remat policy")
    b.legend(fontsize=8)
    fig.suptitle(f"{doc['device']}, {doc['model']['num_params'] / 1e9:.2f} B params ({doc['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
