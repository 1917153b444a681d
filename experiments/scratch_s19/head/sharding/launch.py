"""One host, several JAX processes: start N copies of a command that join one ``jax.distributed`` runtime.

``initialize_distributed()`` with no arguments reads what this launcher sets, so a script written for many hosts
runs unchanged as N processes on one machine (on GPUs, one GPU per process by default)::

    python -m sharding.launch --nproc 4 -- python experiments/bench_tensor_parallel.py ...
    launch([sys.executable, "worker.py"], num_processes=2)        # from Python: the exit codes

Environment given to process i: ``AUTOGLM_COORDINATOR`` (``localhost:<free port>``), ``AUTOGLM_NUM_PROCESSES``,
``AUTOGLM_PROCESS_ID`` = i and, with one device per process, ``AUTOGLM_LOCAL_DEVICE_IDS`` = i (JAX then uses
GPU i only, while CUDA still sees every GPU, so NCCL keeps its peer-to-peer links; not with
``JAX_PLATFORMS=cpu``, where each process keeps its own host devices). CPU devices reach each other through gloo
(``JAX_CPU_COLLECTIVES_IMPLEMENTATION``, set for every launch; GPUs use NCCL). When one process fails, the
others are stopped.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

ENV_COORDINATOR = "AUTOGLM_COORDINATOR"
ENV_NUM_PROCESSES = "AUTOGLM_NUM_PROCESSES"
ENV_PROCESS_ID = "AUTOGLM_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "AUTOGLM_LOCAL_DEVICE_IDS"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: dict[str, str], *, num_processes: int, process_id: int, port: int,
                one_device_each: bool) -> dict[str, str]:
    """The environment of process ``process_id`` of ``num_processes``."""
    env = {**base, ENV_COORDINATOR: f"localhost:{port}", ENV_NUM_PROCESSES: str(num_processes),
           ENV_PROCESS_ID: str(process_id)}
    env.setdefault("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo")  # used only where the devices are CPUs
    if one_device_each and "cpu" not in base.get("JAX_PLATFORMS", ""):
        env[ENV_LOCAL_DEVICE_IDS] = str(process_id)
    return env


def launch(command: list[str], *, num_processes: int, env: dict[str, str] | None = None,
           one_device_each: bool = True, timeout_s: float | None = None, output_dir=None) -> list[int]:
    """Runs ``command`` as ``num_processes`` processes of one distributed runtime; returns their exit codes
    (all of them, in process order). A process that fails or a ``timeout_s`` that passes stops the rest
    (their codes are then negative, the signal's). ``output_dir``: process i's stdout and stderr go to
    ``p<i>.out`` / ``p<i>.err`` there (default: this process's)."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be a positive int; got {num_processes!r}")
    if not command:
        raise ValueError("command is empty: give the program and its arguments, e.g. ['python', 'worker.py']")
    base, port = dict(os.environ if env is None else env), free_port()
    files = []
    if output_dir is not None:
        files = [(open(os.path.join(output_dir, f"p{i}.out"), "w"), open(os.path.join(output_dir, f"p{i}.err"), "w"))
                 for i in range(num_processes)]
    procs = [subprocess.Popen(command, env=process_env(base, num_processes=num_processes, process_id=i, port=port,
                                                       one_device_each=one_device_each),
                              **(dict(stdout=files[i][0], stderr=files[i][1]) if files else {}))
             for i in range(num_processes)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            codes = [p.poll() for p in procs]  # every process, each time (no short-circuit)
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
        for f in (f for pair in files for f in pair):
            f.close()
    return [p.returncode for p in procs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharding.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, required=True, help="number of processes on this host")
    ap.add_argument("--all-devices", action="store_true",
                    help="every process sees every local device (default on GPU: one GPU per process)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before every process is stopped")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    codes = launch(command, num_processes=args.nproc, one_device_each=not args.all_devices, timeout_s=args.timeout)
    bad = [(i, c) for i, c in enumerate(codes) if c != 0]
    if bad:
        print(f"sharding.launch: processes {bad} (index, exit code) failed", file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
