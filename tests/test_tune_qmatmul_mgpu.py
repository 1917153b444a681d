"""experiments/tune_qmatmul_mgpu.py on the CPU: its table merge (a saved run's clear wins only) and its CLI."""

from __future__ import annotations

import json
import sys

import pytest

from experiments import tune_qmatmul_mgpu as tune
from kernels_pallas import qmatmul_tiles


def rows():
    base = dict(m=512, k=4096)
    return [dict(base, shape="qkv", n=4608, method="table", format="int8", us=100.0),
            dict(base, shape="qkv", n=4608, method="mgpu", format="int8", config="bm128 bn128 st4", us=95.0),
            dict(base, shape="qkv", n=4608, method="mgpu", format="int8", config="bm128 bn64 st4", us=97.0),
            dict(base, shape="o", n=4096, method="table", format="int8", us=40.0),
            dict(base, shape="o", n=4096, method="mgpu", format="int8", config="bm128 bn64 st4", us=39.5),
            dict(base, shape="o", n=4096, method="mgpu", format="int8", config="bm64 bn64 st6", error="boom")]


def test_merge_table_takes_only_clear_wins(tmp_path):
    path = tmp_path / "table.json"
    old = dict(device="h100", format="int8", m=512, k=4096, n=4608, us=100.0, config={"kernel": "xla"})
    keep = dict(device="h100", format="int8", m=512, k=4096, n=4096, us=40.0, config={"kernel": "xla"})
    path.write_text(json.dumps(dict(note="test", entries=[old, keep])))
    written = tune.merge_table(rows(), "NVIDIA H100 80GB HBM3", "run.json", table_path=str(path))
    assert written == [("int8", 512, 4096, 4608, 95.0)]  # o's 1.3% is within noise: unchanged
    entries = json.loads(path.read_text())["entries"]
    assert keep in entries and old not in entries and len(entries) == 2
    new = next(e for e in entries if e["n"] == 4608)
    assert qmatmul_tiles.TileConfig(**new["config"]) == qmatmul_tiles.TileConfig(
        kernel="mgpu", block_m=128, block_n=128, num_stages=4)
    assert "100.0" in new["source"] and "95.0" in new["source"]


def test_help_lists_the_formats(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tune_qmatmul_mgpu.py", "--help"])
    with pytest.raises(SystemExit) as e:
        tune.main()
    assert e.value.code == 0 and "int4_g128_sym_kmajor" in capsys.readouterr().out


def test_a_register_operand_tile_round_trips_into_the_table(tmp_path):
    """'256:64:4:r' names weight_regs; the result row's name parses back to the same TileConfig, and a winning
    row of it is written to the table with weight_regs on."""
    cfg = tune.parse_config("256:64:4:r")
    assert (cfg.block_m, cfg.block_n, cfg.num_stages, cfg.weight_regs) == (256, 64, 4, True)
    assert tune.parse_config(tune.config_name(cfg)) == cfg
    assert not tune.parse_config("128:128:4").weight_regs
    k128 = tune.parse_config("128:64:4:r128")
    assert k128.weight_regs and k128.block_k == 128 and tune.parse_config(tune.config_name(k128)) == k128
    assert tune.parse_config("128:64:4:r").block_k == 64
    path = tmp_path / "table.json"
    path.write_text(json.dumps(dict(note="test", entries=[])))
    base = dict(m=512, k=4096, n=4608, shape="qkv", format="int8_kmajor")
    won = [dict(base, method="table", us=60.0), dict(base, method="mgpu", config=tune.config_name(cfg), us=45.0)]
    assert tune.merge_table(won, "NVIDIA H100 80GB HBM3", "run.json", table_path=str(path))
    entry = json.loads(path.read_text())["entries"][0]
    assert entry["config"]["weight_regs"] is True and entry["config"]["block_m"] == 256
