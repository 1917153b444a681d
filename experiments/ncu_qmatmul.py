"""Profile one quantized_matmul kernel launch with NVIDIA Nsight Compute (``ncu``) and keep the report as text.

GPU only; ``ncu`` is on the device image (``/usr/local/cuda/bin/ncu``) and reads hardware counters there. The
script re-runs itself under ``ncu`` as a worker that builds one GLM-4-9B-shaped problem (random weights of the
format, as ``bench_qmatmul.py`` draws them), calls ``quantized_matmul`` three times (compile, warm) and lets ``ncu``
capture the second launch of the Pallas kernel (``--kernel-name regex:qmatmul|matmul_mgpu``).

    python experiments/ncu_qmatmul.py --format int4_g128_sym --shape gate_up --m 1 --out $OUT
    python experiments/ncu_qmatmul.py --format int8 --shape down --m 32 --full --out $OUT    # --set full + source

``--config`` takes a TileConfig as JSON (else the tuned table's choice; an XLA path has no Pallas launch to
capture). Writes ``ncu_<format>_<shape>_m<M>.txt`` under ``--out`` and prints its headline metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

CUDA_NCU = "/usr/local/cuda/bin/ncu"
SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "WarpStateStats", "Occupancy",
            "LaunchStats", "SchedulerStats")
HEADLINES = ("Duration", "DRAM Throughput", "Registers Per Thread", "Achieved Occupancy", "Issue Slots Busy",
             "Warp Cycles Per Issued Instruction", "Executed Instructions", "L1 Wavefronts Shared ")


def find_ncu() -> str:
    """The ncu executable, or a clear error saying where it is expected."""
    path = shutil.which("ncu") or (CUDA_NCU if os.path.exists(CUDA_NCU) else None)
    if path is None:
        raise SystemExit("ncu (NVIDIA Nsight Compute) not found on PATH or at /usr/local/cuda/bin/ncu: this script "
                         "runs on a GPU machine with the CUDA toolkit (the device image has it)")
    return path


def ncu_command(ncu: str, args, worker_argv: list[str]) -> list[str]:
    cmd = [ncu, "--kernel-name", "regex:qmatmul|matmul_mgpu", "--launch-skip", "1", "--launch-count", "1"]
    if args.full:
        cmd += ["--set", "full", "--import-source", "yes", "--print-details", "all"]
    else:
        for s in SECTIONS:
            cmd += ["--section", s]
    return cmd + [sys.executable, os.path.abspath(__file__), "--worker"] + worker_argv


def worker(args):
    import jax
    import jax.numpy as jnp

    from bench_qmatmul import SHAPES, random_weight
    from kernels_pallas.qmatmul_tiles import TileConfig
    from kernels_pallas.quantized_matmul import quantized_matmul

    k, n = SHAPES[args.shape]
    w = random_weight(jax.random.key(0), args.format, k, n)
    x = jax.random.normal(jax.random.key(1), (args.m, k), jnp.float32).astype(jnp.bfloat16)
    cfg = TileConfig(**json.loads(args.config)) if args.config else None
    f = jax.jit(lambda x, w: quantized_matmul(x, w, config=cfg))
    for _ in range(3):
        y = f(x, w).block_until_ready()
    return y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", default="int4_g128_sym", help="as bench_qmatmul: int8, int8_kmajor, int4_g128_sym, ...")
    ap.add_argument("--shape", default="gate_up", choices=["qkv", "o", "gate_up", "down"])
    ap.add_argument("--m", type=int, default=1, help="rows of x (tokens)")
    ap.add_argument("--config", default=None, help="a TileConfig as JSON (default: the tuned table's choice)")
    ap.add_argument("--full", action="store_true", help="ncu --set full with source-level counters")
    ap.add_argument("--out", default=".")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.m < 1:
        ap.error(f"--m must be >= 1; got {args.m}")
    if args.config:
        from kernels_pallas.qmatmul_tiles import TileConfig
        try:
            TileConfig(**json.loads(args.config))
        except (ValueError, TypeError) as e:  # before starting the profiler
            ap.error(f"--config is not a valid TileConfig: {e}")
    if args.worker:
        return worker(args)
    ncu = find_ncu()
    worker_argv = ["--format", args.format, "--shape", args.shape, "--m", str(args.m)]
    worker_argv += ["--config", args.config] if args.config else []
    proc = subprocess.run(ncu_command(ncu, args, worker_argv), capture_output=True, text=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"ncu_{args.format}_{args.shape}_m{args.m}.txt")
    with open(path, "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode != 0 or "Section:" not in proc.stdout:
        raise SystemExit(f"ncu failed (exit {proc.returncode}); its output is in {path}")
    for line in proc.stdout.splitlines():
        if any(line.strip().startswith(h) for h in HEADLINES):
            print(line.rstrip())
    print(f"report: {path}")


if __name__ == "__main__":
    main()
