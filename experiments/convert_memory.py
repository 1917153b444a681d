"""Peak host memory of converting a GLM-4-9B-shaped checkpoint (random bf16, sharded safetensors) to Orbax.

    python experiments/convert_memory.py --work /tmp/convert_memory --out experiments/results

Writes the random checkpoint tensor by tensor (if not already there), then runs ``autoglm convert`` in a
child process and reads its peak resident memory (ru_maxrss). The claim under test: host memory stays a
small multiple of the largest tensor, not the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common  # noqa: E402


def write_random_checkpoint(cfg, directory: Path, shard_gib: float) -> None:
    import ml_dtypes
    import numpy as np

    from autoglm_jax.checkpoint.hf_layout import hf_rules
    from autoglm_jax.checkpoint.safetensors_io import TensorSpec, write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(n, s, np.dtype(ml_dtypes.bfloat16)) for r in hf_rules(cfg) for n, s in zip(r.sources, r.hf_shapes)]
    rng = np.random.default_rng(0)

    def produce(name):
        shape = next(s.shape for s in specs if s.name == name)
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)

    write_safetensors(directory, specs, produce, max_shard_bytes=int(shard_gib * 2**30))
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "bfloat16"
    (directory / "config.json").write_text(json.dumps(hf))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/convert_memory")
    p.add_argument("--out", default=str(bench_common.RESULTS))
    p.add_argument("--preset", default="glm-4-9b")
    p.add_argument("--shard-gib", type=float, default=4.0)
    p.add_argument("--keep", action="store_true", help="keep the random checkpoint and the output")
    args = p.parse_args()
    from autoglm_jax.checkpoint.hf_layout import hf_rules
    from autoglm_jax.config import GLMConfig

    cfg = GLMConfig.from_preset(args.preset)
    work = Path(args.work)
    hf_dir, out_dir = work / "hf", work / "orbax"
    if not (hf_dir / "config.json").exists():
        t = time.perf_counter()
        write_random_checkpoint(cfg, hf_dir, args.shard_gib)
        print(f"wrote random checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    ckpt_bytes = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors"))
    largest = max(2 * int(__import__("numpy").prod(s)) for r in hf_rules(cfg) for s in r.hf_shapes)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "autoglm_jax", "convert", str(hf_dir), str(out_dir)], check=True)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    out_bytes = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    row = dict(preset=args.preset, checkpoint_gib=ckpt_bytes / 2**30, files=len(list(hf_dir.glob("*.safetensors"))),
               largest_tensor_gib=largest / 2**30, peak_rss_gib=peak / 2**30, peak_over_largest=peak / largest,
               peak_over_checkpoint=peak / ckpt_bytes, seconds=seconds, orbax_gib=out_bytes / 2**30)
    summary = {k: row[k] for k in ("checkpoint_gib", "largest_tensor_gib", "peak_rss_gib", "peak_over_largest",
                                   "peak_over_checkpoint", "seconds")}
    bench_common.write_results(args.out, "convert_memory_cpu", rows=[row], summary=summary,
                               columns=list(row), notes=__doc__,
                               device={"platform": "cpu", "kind": "host conversion (2 cores)", "count": 1})
    print(json.dumps(row, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
