"""Same-machine A/B of paged decode kernels: this tree's ``kernels_pallas/paged_attention.py`` against other copies of
that file (e.g. the last commit's, written beside it before the device call), interleaved over rounds.

Each copy is loaded as a module of the ``kernels_pallas`` package (its relative imports resolve to this tree), so
every variant reads the same tuned table and takes the same blocks for a point unless ``--blocks`` names some.
Timing and inputs are ``bench_paged_attention``'s (distinct layers unrolled, pools rotated past L2, GPU span of a
call in a profiler trace). Needs a GPU.

Usage: git show HEAD:kernels_pallas/paged_attention.py > kernels_pallas/_pa_head.py   # before the device call
       python experiments/diag_paged_ab.py --variants head=kernels_pallas/_pa_head.py [name=path ...]
       [--points 32:8192:16:1 32:2048:16:0] [--rounds 3] [--out DIR]
(a point is batch:context:page_size:int8; the tree's own kernel is the variant "tree"; the device tool copies
untracked files, so the copies travel without being committed)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiments import bench_paged_attention as bench  # noqa: E402
from experiments.bench_common import gpu_tag, versions  # noqa: E402
import kernels_pallas  # noqa: E402
from kernels_pallas import paged_attention as tree  # noqa: E402


def load_variant(name: str, path: str):
    """The kernel file at ``path`` as module ``kernels_pallas._ab_<name>``."""
    spec = importlib.util.spec_from_file_location(f"{kernels_pallas.__name__}._ab_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def caller(mod, blocks):
    return lambda q, kp, vp, lengths, table, ks, vs: mod.paged_attention(q, kp, vp, lengths, table, k_scales=ks,
                                                                         v_scales=vs, **blocks)


def check(mod, rng, batch, ctx, page_size, quantized) -> float:
    """Max abs error against the tree's reference on one fresh random case (finite pools, shuffled pages)."""
    lengths = [ctx - 3 * i for i in range(batch)]
    kp, vp, table = bench.random_pages(rng, lengths, page_size)
    ks = vs = None
    if quantized:
        kp, ks = bench.quantize_kv(kp)
        vp, vs = bench.quantize_kv(vp)
    q = jnp.asarray(rng.standard_normal((batch, bench.N, bench.H)), jnp.bfloat16)
    lens = jnp.asarray(lengths, jnp.int32)
    out = mod.paged_attention(q, kp, vp, lens, table, k_scales=ks, v_scales=vs)
    ref = tree.paged_attention_reference(q, kp, vp, lens, table, k_scales=ks, v_scales=vs)
    return float(jnp.max(jnp.abs(out.astype(np.float32) - ref.astype(np.float32))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", default=[], help="name=path of another copy of paged_attention.py")
    ap.add_argument("--points", nargs="+", default=["32:8192:16:1", "32:2048:16:0", "8:32768:16:0", "1:8192:16:0"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--blocks", default="{}", help="JSON block sizes given to every variant (default: the table's)")
    ap.add_argument("--out", default="experiments/results/paged_variants")
    args = ap.parse_args()
    mods = {"tree": tree} | {n: load_variant(n, p) for n, p in (v.split("=", 1) for v in args.variants)}
    blocks = json.loads(args.blocks)
    rng = np.random.default_rng(0)
    rows = []
    for point in args.points:
        batch, ctx, page_size, quantized = (int(x) for x in point.split(":"))
        errs = {n: check(m, rng, batch, min(ctx, 1024), page_size, bool(quantized)) for n, m in mods.items()}
        print(f"{point} max abs error vs reference: {errs}", flush=True)
        layers, q, lengths, rot = bench.make_decode_inputs(rng, batch, ctx, page_size, bool(quantized))
        times = {n: [] for n in mods}
        for r in range(args.rounds):
            for n, m in mods.items():
                t = bench.run_layers(caller(m, blocks), layers, q, lengths, rot, "trace")
                times[n].append(t * 1e6)
                print(f"  round {r} {n}: {t * 1e6:.2f} us", flush=True)
        nbytes = bench.kv_bytes(batch, ctx, bool(quantized))
        rows.append(dict(point=point, batch=batch, context=ctx, page_size=page_size, int8=bool(quantized),
                         kv_bytes=nbytes, max_abs_err=errs, us=times,
                         best_us={n: min(v) for n, v in times.items()}))
        del layers, q
    out = dict(device=gpu_tag(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(), versions=versions(),
               command=" ".join(sys.argv), blocks=blocks, rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"paged_ab_{gpu_tag()}.json"
    path.write_text(json.dumps(out, indent=1))
    for row in rows:
        print(row["point"], {n: round(v, 2) for n, v in row["best_us"].items()})
    print("wrote", path)


if __name__ == "__main__":
    main()
