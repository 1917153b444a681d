"""Training throughput on one GPU: tokens/s and model FLOPs utilisation (MFU) of the full train step
(AdamW, bfloat16 compute, float32 params and moments) for a 1B-class GLM, per remat policy, with peak memory;
and the largest sequence length whose step fits in device memory, per policy (AOT ``memory_analysis``).

    pip install --no-deps -e . && python experiments/training_gpu.py --out experiments/results

Sized to finish in about 5 minutes on one H100 (``--budget-s`` stops the sequence-length search early and
records what was not measured). Writes training_<gpu>.json and .md (e.g. training_h100).

Each policy's timed steps run in a fresh process (a hidden ``--worker``), so its measured peak
(``peak_bytes_in_use``, a high-water mark of the whole process that never resets) is its own, and a policy
that runs out of memory leaves nothing behind for the next. The sequence-length search compiles only (AOT)
and runs in this process, after the workers. ``--tiny`` (hidden) runs the same on CPU with the tiny preset.

MFU = model FLOPs per step / step time / peak dense bf16 FLOP/s of the device. Model FLOPs per token =
6 * (matmul parameters incl. LM head) + 12 * L * N * H * T (attention scores and values; no causal discount);
recomputation under remat is not counted (it is work, not model FLOPs).
"""

from __future__ import annotations

import argparse
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
                                    timeout_s=WORKER_TIMEOUT_S)
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--policies", help="comma-separated remat policies (default: all this device supports)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CPU smoke: tiny preset, no GPU
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # one policy's timing, in a fresh process
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = model_config(args.tiny)
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
    max_seq = {}
    for policy in chosen:
        largest, seq, tried = None, 4096, []
        while seq <= 262144 and time.perf_counter() - start < args.budget_s:
            ok, total = fits(cfg, policy, seq, limit)
            tried.append({"seq_len": seq, "fits": ok, "compiled_total_bytes": total})
            if not ok:
                break
            largest, seq = seq, seq * 2
        max_seq[policy] = {"largest_fitting_power_of_two": largest, "tried": tried,
                           "complete": bool(tried) and not tried[-1]["fits"]}
        print(policy, json.dumps(max_seq[policy]), flush=True)
    kind = dev.device_kind
    name = "training_" + bench_common.gpu_tag()
    doc = {"device": f"{dev.platform}: {kind}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"jax": jax.__version__, "python": platform.python_version()},
           "model": {**cfg.to_hf_dict(), "num_params": cfg.num_params()},
           "rows": rows, "max_seq_len_batch1": max_seq, "memory_limit_bytes": limit,
           "summary": {"best_policy": best, "best_tokens_per_s": max((r["tokens_per_s"] for r in timed), default=None),
                       "best_mfu": next((r["mfu"] for r in timed if r["policy"] == best), None),
                       "peak_flops_assumed": peak_flops(kind), "wall_s": time.perf_counter() - start}}
    bench_common.write_doc(args.out, name, doc, markdown(doc))


def markdown(doc) -> str:
    lines = [f"# Training step on {doc['device']} ({doc['date']})", "",
             f"GLM, {doc['model']['num_params'] / 1e9:.2f} B parameters, D={doc['model']['hidden_size']}, "
             f"L={doc['model']['num_hidden_layers']}, bfloat16 compute, float32 params + AdamW moments.", "",
             "Each policy ran in its own process: its measured peak is its own.", "",
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
    lines += ["", "Largest power-of-two sequence length (batch 1) whose compiled step fits:", "",
              "| policy | largest seq | search complete |", "|---|---|---|"]
    for p, v in doc["max_seq_len_batch1"].items():
        lines.append(f"| {p} | {v['largest_fitting_power_of_two']} | {v['complete']} |")
    lines += ["", f"Best policy: {doc['summary']['best_policy']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
