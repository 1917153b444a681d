"""The Mosaic GPU wgmma kernels of ``quantized_matmul`` (``kernel="mgpu"``) on Hopper, tile by tile, against the tile
table's current path for the format and XLA's bf16 dot, on GLM-4-9B's four linear shapes, in one run. Formats:
``w8a8`` (``qmatmul_w8a8_mgpu``: int8 x int8 wgmma), ``int8`` / ``int8_kmajor`` / ``int4_g128_{sym,asym}_kmajor``
(``qmatmul_mixed_mgpu``: the weight widened to bfloat16 in shared memory, bf16 wgmma).

Each tile configuration is first checked against ``quantized_matmul_reference`` (fresh random weights and
activations); one that fails the check or does not compile is recorded and not timed. Timing as in
``bench_qmatmul.py``: distinct layers unrolled in one jit, a call's GPU span in a profiler trace, per layer. Every
W8A8 time includes the activation quantization (``quantize_rows``), as ``quantized_matmul`` runs it.

Writes <out>/<format>_mgpu_<gpu>.json/.md.
Usage: python experiments/tune_qmatmul_mgpu.py [--format w8a8] [--ms 512,128] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments.bench_common import error_text, gpu_tag, write_results  # noqa: E402
from experiments.bench_qmatmul import SHAPES, layers_for, random_weight, time_layers  # noqa: E402
from kernels_pallas import TileConfig, quantized_matmul  # noqa: E402
from kernels_pallas import qmatmul_mixed_mgpu, qmatmul_tiles, qmatmul_w8a8_mgpu  # noqa: E402
from kernels_pallas.quantized_matmul import quantized_matmul_reference  # noqa: E402

WIN = 0.03  # a table entry changes only where the kernel was at least this much faster
# "block_m:block_n:num_stages": each compute warpgroup's tile and the slots in flight; ":r": the widened weight as
# wgmma's register operand (``weight_regs``; K-major weights only), ":r128" the same with a K step of 128 (int8)
CONFIGS = ["128:128:3", "128:128:4", "64:128:4", "128:64:4", "64:64:6", "128:128:5:r", "128:64:6:r", "128:64:6:r128",
           "256:64:4:r"]
INT4_CONFIGS = ["128:64:3", "64:64:4", "128:64:4:r", "256:64:2:r", "128:128:3:r"]  # one group of 128 a step


def parse_config(text: str) -> TileConfig:
    """'block_m:block_n:num_stages[:r|:r128]' (r: weight_regs with a K step of 64, r128: of 128 for int8) or a
    result row's 'bm128 bn64 st4[ regs[ k128]]' -> TileConfig."""
    if " " in text or text.startswith("bm"):
        parts = text.split()
        bm, bn, st = (int(v[2:]) for v in parts[:3])
        regs, k128 = "regs" in parts[3:], "k128" in parts[3:]
    else:
        parts = text.split(":")
        bm, bn, st = (int(v) for v in parts[:3])
        regs, k128 = parts[3:] in (["r"], ["r128"]), parts[3:] == ["r128"]
    return TileConfig(kernel="mgpu", block_m=bm, block_n=bn, num_stages=st, weight_regs=regs,
                      block_k=64 if regs and not k128 else 128)  # block_k matters only with weight_regs


def config_name(cfg: TileConfig) -> str:
    return (f"bm{cfg.block_m} bn{cfg.block_n} st{cfg.num_stages}" + (" regs" if cfg.weight_regs else "")
            + (" k128" if cfg.weight_regs and cfg.block_k == 128 else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", default="w8a8", choices=("w8a8", "int8", "int8_kmajor", "int4_g128_sym_kmajor",
                                                            "int4_g128_asym_kmajor"))
    ap.add_argument("--ms", default="512")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--min-layers", type=int, default=4, help="distinct layers a timed call, at least")
    ap.add_argument("--configs", default="",
                    help="block_m:block_n:num_stages[:r|:r128],... (r: weight_regs; r128: with a K step of 128, "
                         "int8; default: CONFIGS)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--write-table", action="store_true",
                    help=f"merge into the tile table each (shape, M) whose best kernel beat the table's path by "
                         f">= {WIN * 100:.0f}%% in this run")
    ap.add_argument("--from-json", default="", help="no timing: merge the table from this earlier result file")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        print(merge_table(result["rows"], result["device"]["kind"], args.from_json))
        return
    fmt = args.format
    kernel = qmatmul_w8a8_mgpu if fmt == "w8a8" else qmatmul_mixed_mgpu
    tol = 1e-2 if fmt.startswith("int8") else 2e-2  # W8A8's activation / int4's scaled-weight rounding
    kfmt = "int4" if fmt.startswith("int4") else "int8"
    fits = ((lambda n, k, cfg: kernel.fits(n, k, kernel.tiles_of(cfg))) if fmt == "w8a8" else
            (lambda n, k, cfg: kernel.fits(n, k, kernel.tiles_of(cfg, kfmt), kfmt)))
    rows = []
    for m in [int(v) for v in args.ms.split(",")]:
        for shape in args.shapes.split(","):
            k, n = SHAPES[shape]
            layers = layers_for(k, n, args.min_layers, 256)
            keys = jax.random.split(jax.random.key(7), layers)
            x = jax.random.normal(jax.random.key(3), (m, k), jnp.bfloat16)
            base = dict(shape=shape, m=m, k=k, n=n, layers=layers)
            ws = [random_weight(key, "bf16", k, n) for key in keys]
            bf16_s, _ = time_layers(lambda x, w: x @ w, x, ws, timing="trace")
            rows.append(dict(base, method="xla_bf16", us=bf16_s * 1e6))
            del ws
            ws = [random_weight(key, fmt, k, n) for key in keys]
            cur_s, _ = time_layers(lambda x, w: quantized_matmul(x, w), x, ws, timing="trace")
            rows.append(dict(base, method="table", format=fmt, us=cur_s * 1e6, speedup_vs_bf16=bf16_s / cur_s))
            ref = np.asarray(quantized_matmul_reference(x, ws[0]), np.float32)
            configs = [parse_config(c) for c in (args.configs.split(",") if args.configs
                                                 else INT4_CONFIGS if kfmt == "int4" else CONFIGS)]
            for cfg in configs:
                if not fits(n, k, cfg) or (cfg.weight_regs and (fmt == "w8a8" or not ws[0].k_major)):
                    continue
                row = dict(base, method="mgpu", format=fmt, config=config_name(cfg))
                try:
                    y = np.asarray(quantized_matmul(x, ws[0], config=cfg), np.float32)
                    row["max_err_rel"] = float(np.abs(y - ref).max() / np.abs(ref).max())
                    if not row["max_err_rel"] < tol:
                        raise AssertionError(f"wrong: max error {row['max_err_rel']:.3g} of max |ref|")
                    sec, _ = time_layers(lambda x, w, cfg=cfg: quantized_matmul(x, w, config=cfg), x, ws,
                                         timing="trace")
                    row.update(us=sec * 1e6, speedup_vs_bf16=bf16_s / sec, speedup_vs_table=cur_s / sec)
                except Exception as e:  # a failed configuration is a result too
                    row["error"] = error_text(e)
                print(row, flush=True)
                rows.append(row)
            del ws
            path = save(args.out, fmt, rows)  # after each shape: a run cut short still leaves its rows
    print("SUMMARY", summarize(fmt, rows))
    print("wrote", path)
    if args.write_table:
        print(merge_table(rows, jax.devices()[0].device_kind, path))


def summarize(fmt: str, rows: list[dict]) -> dict:
    """Per M: the worst (over shapes) speedup over bf16 of the table's path and of the best Mosaic GPU tile, and
    the best tile of each shape."""
    summary = {}
    for m in sorted({r["m"] for r in rows}):
        best = {}
        for r in rows:
            if r["m"] == m and r["method"] == "mgpu" and "us" in r:
                if r["shape"] not in best or r["us"] < best[r["shape"]]["us"]:
                    best[r["shape"]] = r
        table = {r["shape"]: r for r in rows if r["m"] == m and r["method"] == "table"}
        summary[f"{fmt}_speedup_vs_bf16_m{m}_table"] = min(r["speedup_vs_bf16"] for r in table.values())
        if len(best) == len(table):
            summary[f"{fmt}_speedup_vs_bf16_m{m}_mgpu"] = min(r["speedup_vs_bf16"] for r in best.values())
            summary[f"best_mgpu_m{m}"] = {s: r["config"] for s, r in best.items()}
    return summary


def save(out: str, fmt: str, rows: list[dict]):
    return write_results(out, f"{fmt}_mgpu_{gpu_tag()}", rows=rows, summary=summarize(fmt, rows),
                         columns=["shape", "m", "method", "config", "us", "speedup_vs_bf16", "speedup_vs_table",
                                  "max_err_rel", "error"], notes=__doc__.strip().splitlines()[0])


def merge_table(rows, device_kind: str, source: str, table_path: str = qmatmul_tiles.TABLE_PATH) -> list:
    """Replace the tile-table entry of each (format, M, K, N) whose fastest checked Mosaic GPU configuration beat
    the table's own path by at least ``WIN`` in the same run; -> the (format, m, k, n, us) written."""
    dev = qmatmul_tiles.device_key(device_kind)
    with open(table_path) as f:
        table = json.load(f)
    written = []
    for table_row in [r for r in rows if r["method"] == "table"]:
        same = [r for r in rows if r["method"] == "mgpu" and "us" in r and
                all(r[key] == table_row[key] for key in ("shape", "m", "k", "n"))]
        if not same:
            continue
        best = min(same, key=lambda r: r["us"])
        if table_row["us"] / best["us"] < 1 + WIN:
            continue
        fmt = best.get("format", source.split("/")[-1].split("_mgpu")[0])
        cfg = parse_config(best["config"])
        key = dict(device=dev, format=fmt, m=best["m"], k=best["k"], n=best["n"])
        table["entries"] = [e for e in table["entries"] if any(e[k] != v for k, v in key.items())]
        table["entries"].append(dict(key, us=round(best["us"], 2), config=cfg.to_json(),
                                     source=f"experiments/tune_qmatmul_mgpu.py ({source}): {best['us']:.1f} us "
                                            f"against the table's {table_row['us']:.1f} us in the same run"))
        written.append((fmt, best["m"], best["k"], best["n"], round(best["us"], 2)))
    with open(table_path, "w") as f:
        json.dump(table, f, indent=1)
    qmatmul_tiles.load_table.cache_clear()
    return written


if __name__ == "__main__":
    main()
