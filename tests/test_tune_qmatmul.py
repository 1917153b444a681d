"""experiments/tune_qmatmul.py on the CPU: the sweep order and the budget shares (the timing itself is GPU-only)."""

from __future__ import annotations

import pytest

from experiments import tune_qmatmul as tune
from kernels_pallas import qmatmul_tiles
from kernels_pallas.qmatmul_tiles import TileConfig


def test_sweep_order_times_the_current_choice_first_and_once():
    cands = tune.candidates("int4_g128_sym_kmajor", 1)
    assert len(cands) > 2
    current = cands[2]
    order = tune.sweep_order(current, cands)
    assert order[0] == current and len(order) == len(cands) and set(order) == set(cands)
    outside = TileConfig(kernel="gemv", block_m=1, block_n=2, block_k=256, split_k=3, num_warps=1, num_stages=1)
    assert outside not in cands
    assert tune.sweep_order(outside, cands) == [outside] + cands
    assert tune.sweep_order(None, cands) == cands


def test_the_h200_sweep_starts_from_the_h100_row():
    """On a device with no rows of its own, what runs now (and is timed first) is the sibling chip's tuned tile."""
    table = qmatmul_tiles.load_table()
    h200 = {(e["format"], e["m"], e["k"], e["n"]) for e in table if e["device"] == "h200"}
    rows = [e for e in table if e["device"] == "h100" and e["m"] == 1
            and (e["format"], e["m"], e["k"], e["n"]) not in h200]
    if not rows:
        pytest.skip("every M=1 format has H200 rows of its own")
    row = rows[0]
    assert qmatmul_tiles.lookup("h200", row["format"], 1, row["k"], row["n"]) == TileConfig(**row["config"])


@pytest.mark.parametrize("budget,elapsed,left,share", [(300, 0, 12, 25), (300, 200, 4, 25), (300, 320, 3, 0),
                                                       (100, 40, 1, 60)])
def test_problem_budget_is_an_even_share_of_what_is_left(budget, elapsed, left, share):
    assert tune.problem_budget(budget, elapsed, left) == pytest.approx(share)


def test_entries_from_sweep_take_each_missing_problem_fastest_row(tmp_path):
    """``--from_sweep``: a sweep file's fastest config per (format, shape, M) becomes an entry, with the file as its
    source; problems the table already holds stay as they are."""
    import json

    dot, gemv = TileConfig(kernel="dot").to_json(), TileConfig(kernel="gemv", block_m=1).to_json()
    rows = [dict(format="int8_kmajor", shape="qkv", m=1, config=dot, us=9.0),
            dict(format="int8_kmajor", shape="qkv", m=1, config=gemv, us=8.0),
            dict(format="int8_kmajor", shape="down", m=1, config=gemv, us=20.0),
            dict(format="int8", shape="o", m=32, config=dot, us=11.5)]
    path = tmp_path / "run_sweep.json"
    path.write_text(json.dumps(dict(device="NVIDIA H200", date="d", rows=rows)))
    held = dict(device="h200", format="int8_kmajor", m=1, k=13696, n=4096, us=21.0, config=dot)
    new = tune.entries_from_sweep(str(path), [held])
    got = {(e["format"], e["m"], e["k"], e["n"]): (e["config"], e["us"]) for e in new}
    assert got == {("int8_kmajor", 1, 4096, 4608): (gemv, 8.0), ("int8", 32, 4096, 4096): (dot, 11.5)}
    assert all(e["device"] == "h200" and str(path) in e["source"] for e in new)
