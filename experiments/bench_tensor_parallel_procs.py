"""Tensor-parallel decode with one process per GPU (``sharding.launch``) against one GPU.

``bench_tensor_parallel.py`` drives every GPU from one process; its TP4 profile (``results/tp_diag/README.md``)
shows three GPUs waiting ~110 us in each all-reduce for the one the host launched last. Here each GPU has its own
process (``initialize_distributed()`` from the launcher's environment: GPU i for process i, NCCL still sees every
GPU): degree 1 runs in one child process, degree N in N children that form one mesh, and this parent, which
never starts JAX on the devices, merges them. Same model, prompts, timing and summary keys as
``bench_tensor_parallel.py`` (its ``run_degree`` and ``summarize``); ``tokens_identical`` is its float32 check
(``--check-dtype``), comparing degree N's greedy tokens with degree 1's.

    python experiments/bench_tensor_parallel_procs.py --processes 4 --batch 1 32        # 4 GPUs
    python experiments/bench_tensor_parallel_procs.py --tiny --processes 2 --out /tmp    # CPU smoke run (gloo)

Writes ``tensor_parallel_<gpu>x<N>_procs.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_common  # noqa: E402
import bench_tensor_parallel as tpb  # noqa: E402


def child(args) -> dict:
    """One process: degree 1 alone (``--child single``) or its share of degree N (``--child group``)."""
    import jax

    from sharding import initialize_distributed

    if args.child == "group":
        initialize_distributed()  # from sharding.launch's environment
    cfg, dtype = tpb.model_config(args)
    model = tpb.bench_model(cfg, dtype, args.quant, args.quant_impl)
    tp = jax.device_count() if args.child == "group" else 1
    rows, tokens_by = [], {}
    tpb.run_degree(model, tp, args, cfg, rows, tokens_by, label=tpb.MAIN)
    del model
    out = {"rows": rows, "tokens": {str(b): tokens_by[(tpb.MAIN, tp, b)].tolist() for b in args.batch},
           "device": {**bench_common.device_info(), "processes": jax.process_count()},
           "versions": bench_common.versions(), "gpu_tag": bench_common.gpu_tag()}
    if args.check_dtype:
        with jax.default_matmul_precision("highest"):
            out["check_tokens"] = tpb.greedy_tokens(cfg, tp, args, args.check_dtype).tolist()
    if args.child == "single" and jax.default_backend() == "gpu":
        out["bandwidth"] = bench_common.measure_copy_bandwidth()
    return out if jax.process_index() == 0 else {}


def merge(args, single: dict, group: dict) -> Path:
    import numpy as np

    n = args.processes
    _, dtype = tpb.model_config(args)  # (with --tiny it also sets the prompt / new tokens the children used)
    rows = single["rows"] + group["rows"]
    tokens_by = {(tpb.MAIN, tp, int(b)): np.asarray(t) for tp, res in ((1, single), (n, group))
                 for b, t in res["tokens"].items()}
    check = None
    if args.check_dtype:
        check = tpb.token_check({1: np.asarray(single["check_tokens"]), n: np.asarray(group["check_tokens"])},
                                args, args.check_dtype)
    summary = tpb.summarize(rows, tokens_by, [1, n], args, dtype, check, single.get("bandwidth"), None)
    summary["launch"] = f"one process per device (sharding.launch), {n} processes for degree {n}"
    name = f"tensor_parallel_{group['gpu_tag']}x{n}" + (f"_{args.quant}" if args.quant else "") + "_procs"
    notes = __doc__.split("\n\n")[1].replace("\n", " ")
    path = bench_common.write_results(args.out, name, rows=rows, summary=summary, columns=tpb.COLUMNS, notes=notes,
                                      device=group["device"], versions_=group["versions"])
    tpb.plot(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, required=True, help="devices (one process each) for degree N")
    tpb.add_run_args(ap)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for each stage")
    ap.add_argument("--child", choices=["single", "group"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.processes < 2:
        raise SystemExit(f"--processes {args.processes}: needs at least 2 (degree 1 is always measured)")
    if args.child:
        res = child(args)
        if res:
            Path(args.worker_out).write_text(json.dumps(res))
        return
    env = dict(os.environ)
    if args.tiny:
        env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    os.environ["XLA_FLAGS"] = env.get("XLA_FLAGS", "")  # the summary records the children's flags
    from sharding.launch import launch

    passed = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        single = bench_common.spawn_worker(__file__, passed + ["--child", "single"], env=env, timeout_s=args.timeout)
        if "error" in single:
            raise SystemExit(f"degree 1 failed: {single['error']}")
        out = Path(tmp) / "group.json"
        codes = launch([sys.executable, __file__, *passed, "--child", "group", "--worker-out", str(out)],
                       num_processes=args.processes, env=env, timeout_s=args.timeout)
        if any(codes) or not out.exists():
            raise SystemExit(f"degree {args.processes} failed: exit codes {codes}")
        group = json.loads(out.read_text())
    print(merge(args, single, group))


if __name__ == "__main__":
    main()
