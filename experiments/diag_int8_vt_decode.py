"""int8-KV paged decode with V pages stored keys-minor ([K, P, H, L]) against the pool layout ([K, P, L, H]).

Why (session 29, ``experiments/results/paged_variants/s29/README.md``): with V [L, H] per page, the bf16 P.V dot wants
its k-pairs (two keys of one column) in one register, and Triton reads the int8 V tile from shared memory a byte
at a time to build them (LDS.U8 11% of the kernel's instructions on the H200, PRMT 14%). With V stored [H, L] the
two keys of a pair are adjacent bytes. This measures that layout before the cache is changed for it: the decode
kernel's experimental ``v_keys_minor`` block option (int8 pages, one page a block, no row gather) on the same
random pool transposed, beside the kernel as the tuned table runs it, at the issue's int8 point (batch 32, context
8192) with pages of 64 (a block of one page is 64 keys).

    python experiments/diag_int8_vt_decode.py --check            # CPU: interpret mode against the reference
    python experiments/diag_int8_vt_decode.py --out $OUT         # GPU: check, then time both (same run)

Writes ``int8_vt_decode_<gpu>.json`` (best of ``--rounds`` interleaved, us a call, GPU span in a profiler trace).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments import bench_paged_attention as bench  # noqa: E402
from experiments.bench_common import gpu_tag, versions  # noqa: E402
from kernels_pallas import paged_attention as pa  # noqa: E402
from kernels_pallas.kv_pages import quantize_kv  # noqa: E402


def keys_minor(pages):
    """[K, P, L, H] -> [K, P, H, L]."""
    return jnp.swapaxes(pages, 2, 3)


def decode_vt(q, k_pages, vt_pages, lengths, page_table, k_scales, v_scales, *, num_splits, num_warps=4,
              num_stages=3, int8_qk=True, interpret=False, poison=False):
    """The decode kernel over int8 pages with V keys-minor (``vt_pages`` [K, P, H, L]); q [B, N, H] -> [B, N, H]
    (poison: the outputs start as NaN and must be overwritten, as the kernel tests run it)."""
    max_pages = page_table.shape[1]
    blocks = pa.decode_blocks(q.shape[0], k_pages.shape[0], q.shape[1] // k_pages.shape[0], max_pages,
                              k_pages.shape[2], True, pages_per_block=1, num_splits=num_splits, num_warps=num_warps,
                              num_stages=num_stages, prefetch_ids=True, row_gather=False, int8_qk=int8_qk)
    blocks["v_keys_minor"] = True
    return pa._decode_triton(q, k_pages, vt_pages, lengths, page_table, k_scales, v_scales,
                             scale=q.shape[-1] ** -0.5, blocks=blocks, interpret=interpret, poison=poison)


def check(interpret: bool) -> list[dict]:
    """Relative error (norm) against the reference on fresh random int8 pools (shuffled pages, ragged lengths
    ending mid-page and on a page boundary, a one-token sequence), NaN-poisoned outputs, a few split / stage
    settings."""
    rows = []
    for page_size, splits, stages in ((16, 1, 2), (16, 3, 3), (64, 2, 3)):
        rng = np.random.default_rng(page_size + splits)
        lengths = [5 * page_size + 3, 2 * page_size, 1]
        kp, vp, table = bench.random_pages(rng, lengths, page_size)
        kp, ks = quantize_kv(kp)
        vp, vs = quantize_kv(vp)
        q = jnp.asarray(rng.standard_normal((len(lengths), bench.N, bench.H)), jnp.bfloat16)
        lens = jnp.asarray(lengths, jnp.int32)
        out = decode_vt(q, kp, keys_minor(vp), lens, table, ks, vs, num_splits=splits, num_stages=stages,
                        interpret=interpret, poison=True)
        ref = pa.paged_attention_reference(q, kp, vp, lens, table, k_scales=ks, v_scales=vs)
        o, r = (np.asarray(x, np.float64) for x in (out, ref))
        err = float(np.linalg.norm(o - r) / np.linalg.norm(r))
        rows.append(dict(page_size=page_size, num_splits=splits, num_stages=stages, rel_err=err))
        print(f"check L{page_size} s{splits} st{stages}: rel err {err:.2e}", flush=True)
        if not err < 1e-2 or not np.isfinite(o).all():
            raise SystemExit(f"keys-minor V decode disagrees with the reference: {rows[-1]}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only the check (interpret mode off a GPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--splits", default="4,8,16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/paged_variants")
    args = ap.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    checks = check(interpret=not on_gpu)
    if args.check or not on_gpu:
        return
    rng = np.random.default_rng(0)
    b, ctx, page_size = args.batch, args.context, args.page_size
    layers, q, lengths, rot = bench.make_decode_inputs(rng, b, ctx, page_size, quantized=True)
    vt_layers = [(kp, keys_minor(vp), ks, vs, tables) for kp, vp, ks, vs, tables in layers]
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    sweep = {}
    for splits, warps, stages in itertools.product(ints(args.splits), ints(args.warps), ints(args.stages)):
        call = lambda q_, kp, vp, lens, table, ks, vs, c=(splits, warps, stages): decode_vt(  # noqa: E731
            q_, kp, vp, lens, table, ks, vs, num_splits=c[0], num_warps=c[1], num_stages=c[2])
        try:
            sweep[(splits, warps, stages)] = bench.run_layers(call, vt_layers, q, lengths, rot, "trace") * 1e6
        except Exception as e:  # noqa: BLE001 - a setting that does not compile is reported and skipped
            print(f"  skip s{splits} w{warps} st{stages}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        print(f"  keys-minor s{splits} w{warps} st{stages}: {sweep[(splits, warps, stages)]:.2f} us", flush=True)
    best = min(sweep, key=sweep.get)
    call_vt = lambda q_, kp, vp, lens, table, ks, vs: decode_vt(  # noqa: E731
        q_, kp, vp, lens, table, ks, vs, num_splits=best[0], num_warps=best[1], num_stages=best[2])
    times = {"pool_layout_tuned": [], "keys_minor_best": []}
    for _ in range(args.rounds):  # interleaved, the tuned table's blocks for the pool layout
        times["pool_layout_tuned"].append(bench.run_layers(bench.ours(), layers, q, lengths, rot, "trace") * 1e6)
        times["keys_minor_best"].append(bench.run_layers(call_vt, vt_layers, q, lengths, rot, "trace") * 1e6)
    nbytes = bench.kv_bytes(b, ctx, quantized=True)
    best_us = {k: min(v) for k, v in times.items()}
    summary = dict(point=f"b{b} ctx{ctx} L{page_size} int8", kv_bytes=nbytes, best_us=best_us,
                   keys_minor_blocks=dict(num_splits=best[0], num_warps=best[1], num_stages=best[2]),
                   speedup=best_us["pool_layout_tuned"] / best_us["keys_minor_best"])
    out = dict(device=gpu_tag(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(), versions=versions(),
               command=" ".join(sys.argv), summary=summary, checks=checks, rounds_us=times,
               sweep=[dict(num_splits=s, num_warps=w, num_stages=st, us=t) for (s, w, st), t in sweep.items()])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"int8_vt_decode_{gpu_tag()}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
