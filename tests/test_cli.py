"""The ``autoglm`` command line: help, generate, convert/export, memory, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from autoglm_jax.cli import main


def test_module_and_help():
    out = subprocess.run([sys.executable, "-m", "autoglm_jax", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("generate", "convert", "export", "memory", "quantize", "serve", "serve-bench"):
        assert cmd in out.stdout


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_generate_streams_text(capsys):
    assert main(["generate", "--prompt", "def add(a, b):", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def add(a, b):")
    assert len(out.out.strip()) > len("def add(a, b):")
    assert "12 tokens" in out.err or "tokens in" in out.err


def test_generate_prompt_longer_than_context(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x " * 5000, "--max-new-tokens", "8"])
    assert e.value.code == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_generate_bad_sampling_args(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "hi", "--top-p", "1.5"])
    assert "top_p=1.5 must be in (0, 1]" in capsys.readouterr().err


def test_convert_export_round_trip_and_errors(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from autoglm_jax.checkpoint.safetensors_io import SafetensorsReader

    from .hf_fixtures import make_hf_model, save_hf

    hf = save_hf(make_hf_model(layers=1).to(torch.bfloat16), tmp_path / "hf")
    assert main(["convert", str(hf), str(tmp_path / "o")]) == 0
    assert main(["export", str(tmp_path / "o"), str(tmp_path / "back")]) == 0
    a, b = SafetensorsReader(hf), SafetensorsReader(tmp_path / "back")
    assert all(a.read(n).tobytes() == b.read(n).tobytes() for n in a.names())
    assert main(["convert", str(hf), str(tmp_path / "o")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing-here"), str(tmp_path / "o2")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_memory_table(capsys):
    assert main(["memory", "--model", "glm-4-9b", "--dtype", "bfloat16", "--kv-dtype", "int8", "--batch", "32",
                 "--context", "8192"]) == 0
    out = capsys.readouterr().out
    # 9.40e9 parameters in bf16 (hand count in tests/test_config.py) = 18,799,902,720 bytes.
    assert "18,799,902,720" in out


def test_tensor_parallel_needs_devices(capsys):
    assert main(["generate", "--prompt", "hi", "--tensor-parallel", "64"]) == 2
    assert "needs 64 devices" in capsys.readouterr().err
