"""Several JAX processes on one host (``sharding.launch`` + ``initialize_distributed``), on CPU through gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sharding.launch import launch
from tests.multiprocess_worker import NEW_TOKENS, PROMPTS

WORKER = Path(__file__).with_name("multiprocess_worker.py")
CLI_WORKER = Path(__file__).with_name("cli_text_worker.py")  # the CLI's own stdout, without gloo's log
ROOT = Path(__file__).resolve().parents[1]


def cpu_env(devices_per_process: int) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}


def test_tensor_parallel_across_two_processes_matches_one_device(tmp_path):
    import autoglm_jax as ag
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.loading import random_model

    codes = launch([sys.executable, str(WORKER), str(tmp_path)], num_processes=2, env=cpu_env(2), timeout_s=300,
                   output_dir=tmp_path)
    assert codes == [0, 0], [(tmp_path / f"p{i}.err").read_text()[-1500:] for i in range(2)]
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert [(r["process"], r["processes"], r["devices"], r["local_devices"]) for r in results] == [
        (0, 2, 4, 2), (1, 2, 4, 2)]  # one runtime: tensor parallel 4 over both processes' devices
    model = random_model(GLMConfig.from_preset("tiny"), dtype="float32", seed=0)
    expected = ag.generate(model, PROMPTS, ag.GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=()))
    for r in results:
        assert r["tokens"] == expected
        assert r["engine_tokens"] == expected  # the paged engine over the same two-process mesh


def test_a_failing_process_stops_the_others():
    code = ("import os, sys, time\n"
            "sys.exit(3) if os.environ['AUTOGLM_PROCESS_ID'] == '1' else time.sleep(120)")
    t0 = time.monotonic()
    codes = launch([sys.executable, "-c", code], num_processes=3, env=cpu_env(1))
    assert codes[1] == 3
    assert codes[0] != 0 and codes[2] != 0  # stopped, not left running
    assert time.monotonic() - t0 < 60


def test_environment_per_process():
    from sharding.launch import process_env

    gpu = process_env({"X": "1"}, num_processes=4, process_id=2, port=1234, one_device_each=True)
    assert (gpu["AUTOGLM_COORDINATOR"], gpu["AUTOGLM_NUM_PROCESSES"], gpu["AUTOGLM_PROCESS_ID"],
            gpu["AUTOGLM_LOCAL_DEVICE_IDS"], gpu["X"]) == ("localhost:1234", "4", "2", "2", "1")
    cpu = process_env({"JAX_PLATFORMS": "cpu"}, num_processes=2, process_id=0, port=1, one_device_each=True)
    assert cpu["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo" and "AUTOGLM_LOCAL_DEVICE_IDS" not in cpu


def test_generate_cli_under_the_launcher_writes_once_and_matches_one_process(tmp_path):
    one_dir, procs_dir = tmp_path / "one", tmp_path / "procs"
    one_dir.mkdir(), procs_dir.mkdir()
    command = [sys.executable, str(CLI_WORKER), "generate", "--prompt", "Hello", "--max-new-tokens", "6"]
    codes = launch(command[:2] + [str(procs_dir)] + command[2:] + ["--tensor-parallel", "4"], num_processes=2,
                   env=cpu_env(2), timeout_s=300, output_dir=procs_dir)
    assert codes == [0, 0], [(procs_dir / f"p{i}.err").read_text()[-1500:] for i in range(2)]
    one = subprocess.run(command[:2] + [str(one_dir)] + command[2:], env=cpu_env(1), capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    expected = (one_dir / "text0.txt").read_text()
    assert expected.startswith("Hello") and len(expected) > len("Hello\n")
    assert (procs_dir / "text0.txt").read_text() == expected
    assert (procs_dir / "text1.txt").read_text() == ""  # the generated text is written by process 0 only
