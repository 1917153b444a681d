"""tuned_device: which device's rows of a tuned table serve the device in hand."""

import pytest

from kernels_pallas import tuned_device
from kernels_pallas.tuned_device import device_key, rows_for


@pytest.mark.parametrize("kind,key", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("h100", "h100"),
                                      ("NVIDIA A100-SXM4-80GB", "a100"), ("Some New GPU", "somenewgpu")])
def test_device_key(kind, key):
    assert device_key(kind) == key


def test_rows_for_own_then_sibling_then_none():
    rows = [{"device": "NVIDIA H100 80GB HBM3", "v": 1}, {"device": "h100", "v": 2}, {"device": "a100", "v": 3}]
    assert [r["v"] for r in rows_for(rows, "NVIDIA H100 PCIe")] == [1, 2]  # both spellings of the H100
    assert [r["v"] for r in rows_for(rows, "NVIDIA H200")] == [1, 2]  # the H200 takes the H100's rows
    assert rows_for(rows, "NVIDIA L4") == []  # no sibling with rows: the caller's defaults
    own = rows + [{"device": "NVIDIA H200", "v": 4}]
    assert [r["v"] for r in rows_for(own, "NVIDIA H200")] == [4]  # rows of its own win
    assert [r["v"] for r in rows_for(own, "NVIDIA A100-SXM4-40GB")] == [3]
    by_pair = [("NVIDIA H100 80GB HBM3", "x")]
    assert rows_for(by_pair, "NVIDIA H200", device=lambda r: r[0]) == by_pair


def test_siblings_name_known_keys():
    for key, sibs in tuned_device.SIBLINGS.items():
        assert key in tuned_device.KNOWN and all(s in tuned_device.KNOWN and s != key for s in sibs)


def test_committed_tables_serve_the_h200(monkeypatch):
    """Every tuned table answers on an H200: the split-K, GLU and dense decode lookups with the H100's rows (it has
    none of its own there yet), the paged attention lookup with its own, the quantized-matmul lookup with the H100's
    row for a problem tuned on the H100 alone."""
    from kernels_pallas import dense_decode_attention, glu_matmul, paged_attention, qmatmul_tiles, splitk_matmul

    monkeypatch.setattr(paged_attention, "device_kind", lambda: "NVIDIA H200")
    monkeypatch.setattr(dense_decode_attention, "device_kind", lambda: "NVIDIA H200")
    h100 = "NVIDIA H100 80GB HBM3"
    split = [e for e in splitk_matmul._table(splitk_matmul.TABLE_PATH)["entries"] if e["config"] != "xla"][0]
    assert splitk_matmul.tuned_blocks("NVIDIA H200", split["m"], split["k"], split["n"]) == \
        splitk_matmul.tuned_blocks(h100, split["m"], split["k"], split["n"]) is not None
    glu = [e for e in splitk_matmul._table(glu_matmul.TABLE_PATH)["entries"] if e["config"] != "xla"][0]
    assert glu_matmul.tuned_blocks("NVIDIA H200", glu["m"], glu["k"], glu["n"]) is not None
    assert dense_decode_attention.tuned_blocks(1) != {}
    assert paged_attention.tuned_blocks("decode", batch=32, context=2048, quantized=False, group=16,
                                        page_size=16)[1] != {}
    table = qmatmul_tiles.load_table()
    own = {(e["format"], e["m"], e["k"], e["n"]) for e in table if e["device"] == "h200"}
    row = next(e for e in table if e["device"] == "h100" and (e["format"], e["m"], e["k"], e["n"]) not in own)
    got = qmatmul_tiles.lookup("h200", row["format"], row["m"], row["k"], row["n"])
    assert got == qmatmul_tiles.lookup("h100", row["format"], row["m"], row["k"], row["n"])
    assert got == qmatmul_tiles.TileConfig(**row["config"])
