"""experiments/ncu_qmatmul.py: the Nsight Compute wrapper's command, its errors, and its worker (CPU: the worker
runs the problem through quantized_matmul's CPU path; ncu itself only exists on the GPU machine)."""

from __future__ import annotations

import argparse
import importlib
import json

import numpy as np

import pytest

ncu_qmatmul = importlib.import_module("experiments.ncu_qmatmul")


def test_missing_ncu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ncu_qmatmul.shutil, "which", lambda name: None)
    monkeypatch.setattr(ncu_qmatmul.os.path, "exists", lambda p: False)
    with pytest.raises(SystemExit, match="ncu .*not found.*device image"):
        ncu_qmatmul.find_ncu()


def test_command_profiles_one_warm_launch_of_the_pallas_kernel():
    args = argparse.Namespace(full=False)
    cmd = ncu_qmatmul.ncu_command("/x/ncu", args, ["--m", "1"])
    assert cmd[:7] == ["/x/ncu", "--kernel-name", "regex:qmatmul|matmul_mgpu", "--launch-skip", "1", "--launch-count", "1"]
    assert cmd.count("--section") == len(ncu_qmatmul.SECTIONS) and "--set" not in cmd
    assert cmd[-3:] == ["--worker", "--m", "1"]
    full = ncu_qmatmul.ncu_command("/x/ncu", argparse.Namespace(full=True), [])
    assert full[full.index("--set") + 1] == "full" and "--section" not in full


def test_bad_arguments_fail_before_profiling(capsys):
    with pytest.raises(SystemExit):
        ncu_qmatmul.main(["--config", json.dumps({"kernel": "gemv", "block_m": 4}), "--out", "/nonexistent"])
    assert "not a valid TileConfig" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ncu_qmatmul.main(["--m", "0"])
    assert "--m must be >= 1" in capsys.readouterr().err


def test_worker_runs_the_problem():
    y = ncu_qmatmul.main(["--worker", "--format", "int4_g128_sym", "--shape", "o", "--m", "2",
                          "--config", json.dumps({"kernel": "dot", "block_m": 16, "asm_dequant": True})])
    assert y.shape == (2, 4096) and bool(np.isfinite(np.asarray(y, np.float32)).all())
    assert float(np.abs(np.asarray(y, np.float32)).max()) > 0
