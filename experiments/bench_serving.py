"""Serving benchmark: the paged engine (continuous batching, prefix cache) vs Hugging Face batched generation.

Workload (GLM-4-9B shapes, random weights, greedy, EOS ignored): ``--requests`` requests sharing one
``--prefix``-token system prompt, each with a ``--suffix``-token unique tail and an output length drawn
uniformly from ``--min-out..--max-out``. Two arrival patterns: all at once, and Poisson at ``--rate`` req/s.

Parts, each in its own process (so memory pools and peaks do not mix):

* ``bf16``: this engine on the bfloat16 model; ``int8``: the same with int8 weights (``quantize_model``).
  Each builds ``LLM`` (KV pages from free memory via ``autoglm_jax.memory``), compiles every step shape
  (``LLM.warmup``), then serves both arrival patterns and measures batch-32 decode steps alone.
* ``hf``: ``transformers`` ``generate`` on fixed batches (static cache, the faster HF mode in
  decode_<gpu>.md), requests in arrival order, every batch generating ``--max-out`` tokens (a static
  batch runs until its longest request; one cache shape, compiled once); only requested tokens count. It is an offline batch run: only its all-at-once throughput is compared.

    python experiments/bench_serving.py                                   # GPU: writes serving_<gpu>.json/.md
    python experiments/bench_serving.py --tiny --out /tmp/serving_smoke   # CPU smoke (tiny model)
    python experiments/bench_serving.py --parts hf; ... --parts bf16 --reuse   # one part per command

Definitions: throughput = output tokens / wall time from the first arrival to the last token; TTFT = first
token time - arrival; ITL = gaps between a request's consecutive tokens (host time when the step returns).
prefix_hit_rate = cached prompt tokens / prompt tokens looked up (scheduler stats). kv_waste_frac = slots of
allocated pages not holding tokens / allocated slots, averaged over steps. compilations_after_warmup =
programs traced while serving after ``warmup()`` (0 = no recompilation). memory_predicted = parameters +
KV pages + step workspace (memory model), memory_measured = the device's peak bytes in use.
b32_decode_frac_roofline = (bytes a batch-32 decode step must read: every weight once except the embedding
table, plus every sequence's KV) / copy bandwidth measured in the same process, divided by the median time
of a whole engine decode step (host scheduling and the token read-back included). In ``--tiny`` mode the
"bf16" part runs float32 on CPU and its batch is capped by max_num_seqs=8 (a smoke run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common  # noqa: E402

GiB = 2 ** 30


def workload(args, vocab: int):
    """[(arrival_s, prompt_ids, max_tokens)] for both patterns; same prompts and lengths in each."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    prefix = rng.integers(1, vocab, args.prefix).tolist()
    reqs = [(prefix + rng.integers(1, vocab, args.suffix).tolist(), int(rng.integers(args.min_out, args.max_out + 1)))
            for _ in range(args.requests)]
    gaps = rng.exponential(1.0 / args.rate, args.requests)
    poisson = np.cumsum(gaps) - gaps[0]
    return {"all_at_once": [(0.0, p, n) for p, n in reqs],
            "poisson": [(float(t), p, n) for t, (p, n) in zip(poisson, reqs)]}


def percentiles(xs, ps=(50, 90, 99)) -> dict:
    import numpy as np

    if not xs:
        return {f"p{p}": None for p in ps}
    return {f"p{p}": float(np.percentile(xs, p)) for p in ps}


def serve(llm, requests, *, tag: str) -> dict:
    """Feeds requests at their arrival times (relative to now) and steps the engine until all finish."""
    import numpy as np

    from autoglm_jax.engine import SamplingParams

    pending = sorted(requests, key=lambda r: r[0])
    stats0 = llm.stats()
    comp0 = llm.num_compilations
    ids, waste, alloc, steps = [], 0, 0, 0
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or llm.has_unfinished():
        now = time.perf_counter() - t0
        while i < len(pending) and pending[i][0] <= now:
            arrival, prompt, n = pending[i]
            rid = llm.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                  request_id=f"{tag}-{i}")
            llm.completions[rid].arrival_time = t0 + arrival
            ids.append(rid)
            i += 1
        if not llm.has_unfinished():
            time.sleep(max(0.0, min(pending[i][0] - now, 0.05)))
            continue
        llm.step()
        kv = llm.kv_waste()
        waste, alloc, steps = waste + kv["wasted_slots"], alloc + kv["allocated_slots"], steps + 1
    wall = time.perf_counter() - t0
    comps = [llm.completions[r] for r in ids]
    out_tokens = sum(len(c.token_ids) for c in comps)
    stats = llm.stats()
    looked = stats.prefix_lookup_tokens - stats0.prefix_lookup_tokens
    hit = stats.prefix_hit_tokens - stats0.prefix_hit_tokens
    ttft = [c.ttft for c in comps]
    itl = [x for c in comps for x in c.itl]
    return dict(pattern=tag, requests=len(comps), output_tokens=out_tokens, wall_s=wall,
                throughput_tok_s=out_tokens / wall, steps=steps,
                **{f"ttft_{k}_s": v for k, v in percentiles(ttft).items()},
                **{f"itl_{k}_ms": (None if v is None else 1e3 * v) for k, v in percentiles(itl).items()},
                prefix_hit_rate=hit / looked if looked else 0.0, kv_waste_frac=waste / alloc if alloc else 0.0,
                preemptions=stats.preemptions - stats0.preemptions,
                compilations_during=llm.num_compilations - comp0,
                mean_ttft_s=float(np.mean(ttft)))


def decode_b32(llm, cfg, args, bandwidth, embed_bytes: int) -> dict:
    """Median decode-only step time at batch 32 (prompts prefilled first) and its roofline fraction."""
    import numpy as np

    from autoglm_jax.engine import SamplingParams
    from autoglm_jax.memory import kv_bytes_per_token_per_layer

    rng = np.random.default_rng(1)
    ctx = args.prefix + args.suffix
    ids = [llm.add_request(rng.integers(1, cfg.vocab_size, ctx).tolist(),
                           SamplingParams(max_tokens=args.decode_steps + 2, temperature=0.0, ignore_eos=True),
                           request_id=f"b32-{j}") for j in range(32)]
    while any(not llm.completions[r].token_ids for r in ids):
        llm.step()
    times = []
    while llm.has_unfinished():
        t = time.perf_counter()
        llm.step()
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times[1:-1] if len(times) > 3 else times))
    kv_tok = kv_bytes_per_token_per_layer(cfg, llm.kv_dtype, tensor=llm.memory["tensor_parallel"]) * cfg.num_layers
    # every weight once, except the embedding table (only the batch's rows are gathered), plus each KV read
    # (per device with --tensor-parallel: its shards, against one device's copy bandwidth)
    read = llm.memory["param_bytes"] - embed_bytes + 32 * (ctx + args.decode_steps // 2) * kv_tok
    out = dict(b32_decode_step_ms=1e3 * step_s, b32_bytes_per_step=read)
    if bandwidth:
        out["b32_decode_frac_roofline"] = read / bandwidth / step_s
    return out


def jax_worker(args) -> dict:
    import jax
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.engine import LLM
    from autoglm_jax.loading import random_model

    cfg = GLMConfig.from_preset(args.preset)
    on_cpu = jax.default_backend() == "cpu"
    bandwidth = bench_common.measure_copy_bandwidth(nbytes=(64 << 20) if on_cpu else (2 << 30))
    model = random_model(cfg, dtype=args.dtype, seed=0)
    if args.worker == "int8":
        from autoglm_jax.model.quantized_linear import quantize_model
        quantize_model(model, "int8")
    jax.block_until_ready(nnx.state(model))
    max_len = args.prefix + args.suffix + args.max_out
    t = time.perf_counter()
    mesh = None
    if args.tensor_parallel > 1:  # shard here, so no full copy stays on device 0 (it would shrink the pool)
        from sharding import make_mesh, shard_model
        mesh = make_mesh(tensor=args.tensor_parallel)
        model = shard_model(model, mesh)
    llm = LLM(model, page_size=args.page_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
              num_pages=args.num_pages, kv_dtype=args.kv_dtype, memory_headroom=args.headroom,
              token_buckets=args.token_buckets, seq_buckets=args.seq_buckets, mesh=mesh)
    n_shapes = llm.warmup(sampled=False)
    warm_s = time.perf_counter() - t
    comp_warm = llm.num_compilations
    print(f"[{args.worker}] {llm.memory['num_pages']} pages, warm-up {n_shapes} shapes in {warm_s:.1f}s", flush=True)
    rows = []
    for tag, reqs in workload(args, cfg.vocab_size).items():
        row = dict(impl=f"autoglm_jax {args.worker}", **serve(llm, reqs, tag=f"{args.worker}-{tag}"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    dec = decode_b32(llm, cfg, args, None if on_cpu else bandwidth,
                     embed_bytes=model.embed[...].nbytes // args.tensor_parallel)
    stats = jax.devices()[0].memory_stats() or {}
    return dict(rows=rows, bandwidth=bandwidth, warmup_s=warm_s, warmup_shapes=n_shapes,
                compilations_after_warmup=llm.num_compilations - comp_warm, memory=llm.memory,
                peak_bytes=stats.get("peak_bytes_in_use"), **dec)


def hf_worker(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from autoglm_jax.config import GLMConfig

    cfg = GLMConfig.from_preset(args.preset)
    hf_cfg = transformers.GlmConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                       if k not in ("architectures", "model_type", "rope_theta",
                                                    "partial_rotary_factor")})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16 if dev == "cuda" else torch.float32)
    with torch.device(dev):
        model = transformers.GlmForCausalLM(hf_cfg).eval()
    reqs = workload(args, cfg.vocab_size)["all_at_once"]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if dev == "cuda":
        kw["cache_implementation"] = "static"
    rows = []
    deadline = time.perf_counter() + args.hf_budget_s
    for batch in args.hf_batch:
        # Every batch generates max_out tokens (a static batch runs until its longest request; one cache shape,
        # so the static cache compiles once, in the warm-up on the first batch).
        n = args.max_out
        ids0 = torch.tensor([p for _, p, _ in reqs[:batch]], device=dev)
        tw = time.perf_counter()
        with torch.no_grad():
            model.generate(ids0, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        warm_s = time.perf_counter() - tw
        t0 = time.perf_counter()
        useful, done = 0, 0
        for s in range(0, len(reqs), batch):
            if time.perf_counter() > deadline:
                break
            chunk = reqs[s:s + batch]
            ids = torch.tensor([p for _, p, _ in chunk], device=dev)  # equal lengths: no padding needed
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            sync()
            useful += sum(k for _, _, k in chunk)
            done += len(chunk)
        wall = time.perf_counter() - t0
        row = dict(impl=f"hf {'static' if dev == 'cuda' else 'dynamic'}", pattern="all_at_once", hf_batch=batch,
                   requests=done, output_tokens=useful, wall_s=wall, throughput_tok_s=useful / wall, warmup_s=warm_s)
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = torch.cuda.max_memory_allocated() if dev == "cuda" else None
    return dict(rows=rows, peak_bytes=peak, transformers=transformers.__version__, torch=torch.__version__,
                per_request_check=bool(np.all([r["requests"] == len(reqs) for r in rows])))


def spawn(part: str, argv: list[str], out: Path) -> dict | None:
    res = subprocess.run([sys.executable, __file__, *argv, "--worker", part, "--worker-out", str(out)])
    if res.returncode != 0:
        print(f"part {part} failed with exit code {res.returncode}", flush=True)
        return None
    return json.loads(out.read_text())


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload and engine flags, shared with bench_server.py (which serves the same workload over HTTP)."""
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prefix", type=int, default=1024)
    p.add_argument("--suffix", type=int, default=128)
    p.add_argument("--min-out", type=int, default=128)
    p.add_argument("--max-out", type=int, default=256)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--token-buckets", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--seq-buckets", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--num-pages", type=int, default=None, help="default: from free memory")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model and workload")
    p.add_argument("--out", default=str(bench_common.RESULTS))
    p.add_argument("--name", default=None, help="result file name (default serving_<gpu>)")
    p.add_argument("--parts", default="hf,bf16,int8")
    p.add_argument("--reuse", action="store_true", help="merge _serving_<part>.json of parts not run now")
    p.add_argument("--preset", default="glm-4-9b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-dtype", default=None, help="None (= model dtype) or int8")
    add_workload_args(p)
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="engine parts: model and KV pages sharded over N devices (bytes and roofline per device)")
    p.add_argument("--headroom", type=float, default=0.1)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--hf-batch", type=int, nargs="+", default=[64])
    p.add_argument("--hf-budget-s", type=float, default=180.0)
    p.add_argument("--worker", choices=["bf16", "int8", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.dtype, args.requests, args.prefix, args.suffix = "tiny", "float32", 12, 48, 16
        args.min_out, args.max_out, args.rate, args.max_num_seqs = 4, 8, 50.0, 8
        args.max_num_batched_tokens, args.token_buckets, args.seq_buckets = 128, [64, 128], [4, 8]
        args.decode_steps, args.hf_batch, args.num_pages = 4, [4], args.num_pages or 256
    if args.worker:
        res = hf_worker(args) if args.worker == "hf" else jax_worker(args)
        Path(args.worker_out).write_text(json.dumps(res))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    res = {part: spawn(part, argv, out / f"_serving_{part}.json") for part in parts}
    if args.reuse:  # parts run earlier (one GPU command each) are merged into this summary
        for part in ("hf", "bf16", "int8"):
            f = out / f"_serving_{part}.json"
            if part not in parts and f.exists():
                res[part] = json.loads(f.read_text())
        parts = [p_ for p_ in ("hf", "bf16", "int8") if p_ in res]
    rows = [r for part in parts if res.get(part) for r in res[part]["rows"]]

    def tput(part, pattern="all_at_once"):
        for r in (res.get(part) or {}).get("rows", []):
            if r.get("pattern", "").endswith(pattern):
                return r["throughput_tok_s"]
        return None

    hf = max((r["throughput_tok_s"] for r in (res.get("hf") or {}).get("rows", [])), default=None)
    bf, i8 = res.get("bf16"), res.get("int8")
    main_part = bf or i8
    all_rows = [r for part in ("bf16", "int8") if res.get(part) for r in res[part]["rows"]]
    summary = dict(
        bf16_throughput_vs_hf=(tput("bf16") / hf) if hf and tput("bf16") else None,
        int8_throughput_vs_hf=(tput("int8") / hf) if hf and tput("int8") else None,
        prefix_hit_rate=min((r["prefix_hit_rate"] for r in all_rows), default=None),
        kv_waste_frac=max((r["kv_waste_frac"] for r in all_rows), default=None),
        compilations_after_warmup=sum(res[p]["compilations_after_warmup"] for p in ("bf16", "int8") if res.get(p))
        if main_part else None,
        memory_predicted_gib=main_part["memory"]["predicted_peak_bytes"] / GiB if main_part else None,
        memory_measured_gib=(main_part["peak_bytes"] / GiB if main_part and main_part["peak_bytes"] else None),
        b32_decode_frac_roofline=main_part.get("b32_decode_frac_roofline") if main_part else None,
        bf16_throughput_tok_s=tput("bf16"), int8_throughput_tok_s=tput("int8"), hf_throughput_tok_s=hf,
        bf16_poisson_throughput_tok_s=tput("bf16", "poisson"),
        b32_decode_step_ms=main_part.get("b32_decode_step_ms") if main_part else None,
        copy_bandwidth_tb_s=main_part["bandwidth"] / 1e12 if main_part else None,
        warmup_s=main_part["warmup_s"] if main_part else None)
    name = args.name or f"serving_{bench_common.gpu_tag()}"
    bench_common.write_results(
        out, name, rows=rows, summary=summary,
        columns=["impl", "pattern", "requests", "output_tokens", "wall_s", "throughput_tok_s", "ttft_p50_s",
                 "ttft_p99_s", "itl_p50_ms", "itl_p99_ms", "prefix_hit_rate", "kv_waste_frac", "preemptions",
                 "compilations_during", "hf_batch"],
        extra={"args": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")},
               "parts": {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if v else None) for k, v in res.items()}},
        notes=__doc__)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
