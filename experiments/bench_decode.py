"""Decode benchmark: GLM-4-9B shapes with random weights, this project vs Hugging Face transformers.

Each side runs in its own process (so their memory pools do not meet):

    python experiments/bench_decode.py --out experiments/results          # both, then writes decode_<gpu>.*
    python experiments/bench_decode.py --preset tiny --parts jax --out /tmp # a CPU smoke run
    python experiments/bench_decode.py --quant int8 --int8-layout nk --parts jax --name decode_int8_nk_h100

``--int8-layout nk`` (with ``--quant int8``) stores the int8 weights K-major, ``qweight[N, K]``
(``Int8Weight.k_major``, served by XLA's int8 dot or the Pallas K-major tiles); the default ``kn`` is ``[K, N]``; ``auto`` picks per weight
(nk unless K > N: down_proj stays kn, ``k_major="auto"``). ``--also-quant int8,int4``
adds, in the same run, a timing worker per quantized format (int8 with ``--int8-layout``, int4 g128) beside the
float one: their rows, and ``<fmt>_b1_ms_per_token`` / ``<fmt>_b1_speedup`` (over the float run) in the summary.

    python experiments/bench_decode.py --also-quant int8,int4 --int8-layout nk --out $OUT   # issue 3's decode rows

Definitions used for both sides: ``prefill_s`` is the time to the first new token; ``ms_per_token`` is
(generation time - prefill time) / (new tokens - 1) per sequence step; ``tokens_per_s`` is
batch * new tokens / generation time (prefill included; the prefill of 32 x 512 tokens alone is about
0.45 s of matmul at the H100's measured peak, so this end-to-end figure cannot reach 3x HF, whose own
prefill is near that peak); ``decode_tokens_per_s`` is batch * (new tokens - 1) / (generation time - prefill
time), the decode-phase throughput, which the batch-32 floor is checked on. ``roofline_b1_ms`` is parameter bytes over the
copy bandwidth measured in the same run (the time to read every weight once); ``roofline_b1_read_ms`` leaves out
the input embedding table, which a step only gathers B rows from (``b1_frac_of_read_roofline`` is the stricter figure).

Peak memory: the timing worker's ``peak_bytes_in_use`` is a process-wide high-water mark that also holds the
random initialiser's temporaries (2.3 GiB of random bits for the 151552 x 4096 embedding) and XLA's
compile-time autotuning buffers. The ``memory`` part measures generation alone: a fresh process fills the
parameters in place, generates at every batch size, and runs twice over a persistent compilation cache; the
second, measured pass loads its programs instead of compiling them. ``peak_gib`` is that pass's peak
(``peak_gib_cold`` the timing worker's), checked against parameters + KV cache (batch 32) + 2 GiB.
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


def set_take_digits(model, value: str) -> None:
    """``QuantizedLinear.take_digits`` on every projection ("off": no norm writes their input digits)."""
    from flax import nnx

    from autoglm_jax.model.quantized_linear import QuantizedLinear
    for _, m in nnx.iter_modules(model):
        if isinstance(m, QuantizedLinear):
            m.take_digits = value


def _jax_worker(args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import CACHE_BUCKET, GenerationConfig, decode_stream, generate_stream
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.loading import random_model

    cfg = GLMConfig.from_preset(args.preset)
    bandwidth = bench_common.measure_copy_bandwidth() if jax.default_backend() != "cpu" else None
    t0 = time.perf_counter()
    model = random_model(cfg, dtype=args.dtype, seed=0)
    layout = args.int4_layout if args.quant == "int4" else args.int8_layout
    if args.quant != "none":
        from autoglm_jax.model.quantized_linear import quantize_model
        from autoglm_jax.quant.cli import LAYOUTS  # --int8/4-layout -> quantize_model's k_major
        keep = tuple(x for x in args.keep_float.split(",") if x)
        quantize_model(model, fmt=args.quant, k_major=LAYOUTS[layout], keep_float=keep)  # in place
        if getattr(args, "digits", "auto") != "auto":  # A/B: which input digits the norms write
            set_take_digits(model, args.digits)
    jax.block_until_ready(nnx.state(model))
    init_s = time.perf_counter() - t0
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    read_bytes = bench_common.decode_read_bytes(model, param_bytes)
    after_init = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    rows = []
    rng = np.random.default_rng(0)
    gen_cfg = GenerationConfig(max_new_tokens=args.new, eos_token_ids=())
    for batch in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, args.prompt)).astype(np.int32).tolist()
        cache_len = -(-(args.prompt + args.new) // CACHE_BUCKET) * CACHE_BUCKET

        def run_once():
            # generate()'s own device loop (decode_stream): prefill, then new - 1 decode steps dispatched
            # back to back; the first token is read back to time the prefill, the last to end the clock.
            t = time.perf_counter()
            steps = decode_stream(model, prompts, gen_cfg)
            next(steps).block_until_ready()
            t_first = time.perf_counter() - t
            for token in steps:
                pass
            token.block_until_ready()
            return t_first, time.perf_counter() - t

        tc = time.perf_counter()
        run_once()  # compiles prefill and decode
        compile_s = time.perf_counter() - tc
        runs = [run_once() for _ in range(args.reps)]
        prefill_s = float(np.median([r[0] for r in runs]))
        total_s = float(np.median([r[1] for r in runs]))
        kind = args.quant + (f" {layout}" if layout != "kn" else "") if args.quant != "none" else args.dtype
        row = dict(impl=f"autoglm_jax ({kind}, unrolled layers)",
                   batch=batch, prompt=args.prompt, new_tokens=args.new, prefill_s=prefill_s, total_s=total_s,
                   ms_per_token=1e3 * (total_s - prefill_s) / (args.new - 1),
                   tokens_per_s=batch * args.new / total_s,
                   decode_tokens_per_s=batch * (args.new - 1) / (total_s - prefill_s), first_run_s=compile_s)
        # The user-facing streaming path (every step's tokens read back to the host, one step ahead).
        list(generate_stream(model, prompts, gen_cfg))
        t = time.perf_counter()
        list(generate_stream(model, prompts, gen_cfg))
        row["generate_stream_total_s"] = time.perf_counter() - t
        rows.append(row)
        print(json.dumps(row), flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    kv_bytes = DenseKVCache.nbytes(cfg, max(args.batch), cache_len, model.dtype)
    return dict(rows=rows, param_bytes=param_bytes, read_bytes=read_bytes, bandwidth=bandwidth, init_s=init_s,
                peak_bytes=stats.get("peak_bytes_in_use"), peak_bytes_after_init=after_init, kv_bytes_max_batch=kv_bytes,
                layers="unrolled (a Python loop of layers under one jit; no scan on the decode path)")


def _memory_worker(args) -> dict:
    """Device memory of generation alone: the parameters are filled in place (``jnp.full``, no random-number
    temporaries), then prompt x new tokens are generated at each batch size. Run through
    ``spawn_worker(warm_compile_cache=True)``: the measured pass loads its programs from the compilation cache,
    so its ``peak_bytes_in_use`` (a process-wide high-water mark) holds no compiler autotuning buffers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.loading import random_model

    cfg = GLMConfig.from_preset(args.preset)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: random_model(cfg, dtype=args.dtype, seed=0)))
    state = jax.tree.map(lambda a: jnp.full(a.shape, 0.02, a.dtype), abstract)
    model = nnx.merge(graphdef, state)
    stats = lambda: jax.devices()[0].memory_stats() or {}
    jax.block_until_ready(nnx.state(model))
    loaded = stats()
    rng = np.random.default_rng(0)
    gen_cfg = GenerationConfig(max_new_tokens=args.new, eos_token_ids=())
    for batch in args.batch:
        prompts = rng.integers(0, cfg.vocab_size, size=(batch, args.prompt)).astype(np.int32).tolist()
        for token in decode_stream(model, prompts, gen_cfg):
            pass
        token.block_until_ready()
    end = stats()
    return {"param_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "bytes_in_use_loaded": loaded.get("bytes_in_use"), "peak_bytes_loaded": loaded.get("peak_bytes_in_use"),
            "peak_bytes": end.get("peak_bytes_in_use")}


def _hf_worker(args) -> dict:
    import torch
    import transformers

    from autoglm_jax.config import GLMConfig

    cfg = GLMConfig.from_preset(args.preset)
    hf_cfg = transformers.GlmConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                       if k not in ("architectures", "model_type", "rope_theta",
                                                    "partial_rotary_factor")})
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.GlmForCausalLM(hf_cfg).eval()
    rows, deadline = [], time.perf_counter() + args.hf_budget_s
    for mode in ("dynamic", "static"):
        for batch in args.batch:
            if time.perf_counter() > deadline:
                rows.append(dict(impl=f"hf_{mode}", batch=batch, skipped="time budget"))
                continue
            ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt), device="cuda")
            kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
            if mode == "static":
                kw["cache_implementation"] = "static"

            def gen(n):
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                torch.cuda.synchronize()
                return time.perf_counter() - t

            tc = time.perf_counter()
            gen(args.new)  # warm-up (torch.compile for the static cache)
            first = time.perf_counter() - tc
            prefill_s = min(gen(1) for _ in range(2))
            total_s = gen(args.new)
            row = dict(impl=f"hf_{mode}", batch=batch, prompt=args.prompt, new_tokens=args.new,
                       prefill_s=prefill_s, total_s=total_s,
                       ms_per_token=1e3 * (total_s - prefill_s) / (args.new - 1),
                       tokens_per_s=batch * args.new / total_s,
                       decode_tokens_per_s=batch * (args.new - 1) / (total_s - prefill_s), first_run_s=first)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return dict(rows=rows, peak_bytes=torch.cuda.max_memory_allocated(), transformers=transformers.__version__,
                torch=torch.__version__)


def _worker_argv(part: str, args) -> list[str]:
    return ["--worker", part, "--preset", args.preset, "--dtype", args.dtype, "--quant", args.quant,
            "--int8-layout", args.int8_layout if args.quant == "int8" else "kn",
            "--int4-layout", args.int4_layout if args.quant == "int4" else "kn", "--keep-float", args.keep_float,
            "--prompt", str(args.prompt), "--new", str(args.new),
            "--reps", str(args.reps), "--hf-budget-s", str(args.hf_budget_s), "--digits", args.digits,
            "--batch", *map(str, args.batch)]


def _spawn(part: str, args, out: Path) -> dict:
    if part in args.reuse.split(","):  # an earlier call's worker file (--reuse)
        if not out.exists():
            raise SystemExit(f"--reuse {part}: {out} is missing; run that part first with the same --out")
        print(f"reusing {out}", flush=True)
        return json.loads(out.read_text())
    subprocess.run([sys.executable, __file__, *_worker_argv(part, args), "--worker-out", str(out)], check=True)
    return json.loads(out.read_text())


def _spawn_memory(args, out: Path) -> dict:
    if "memory" in args.reuse.split(","):
        return _spawn("memory", args, out)
    res = bench_common.spawn_worker(__file__, _worker_argv("memory", args), warm_compile_cache=True, timeout_s=600)
    print("memory worker:", json.dumps(res), flush=True)
    out.write_text(json.dumps(res))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(bench_common.RESULTS))
    p.add_argument("--preset", default="glm-4-9b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", default="none", help="none, or a QuantizedLinear format (int8, int4)")
    p.add_argument("--int8-layout", default="kn",
                   help="with --quant int8: kn (qweight [K, N], default), nk (K-major [N, K]) or "
                        "auto (per weight: nk unless K > N)")
    p.add_argument("--int4-layout", default="kn",
                   help="with --quant int4: kn (packed [K/2, N], default), nk (K-major [N, K/2], the one-row "
                        "integer-dot kernel) or auto (nk for every weight)")
    p.add_argument("--keep-float", default="lm_head",
                   help="with --quant: comma-separated layer patterns kept in float ('' quantizes the LM head too)")
    p.add_argument("--digits", choices=["auto", "all", "off"], default="auto",
                   help="quantized runs: QuantizedLinear.take_digits for every projection ('off': each computes its "
                        "input's digits itself; 'all': the norms write the int4 planes too)")
    p.add_argument("--also-quant", default="", help="comma-separated formats (int8, int4) timed beside the float run")
    p.add_argument("--parts", default="jax,memory,hf")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hf-budget-s", type=float, default=240.0)
    p.add_argument("--name", default=None, help="result file name (default decode_<gpu>)")
    p.add_argument("--reuse", default="",
                   help="comma-separated parts (jax, memory, hf) read from their worker files in --out, written by an "
                        "earlier call on the same machine, instead of run again: a whole run split over two calls "
                        "that each fit a time limit")
    p.add_argument("--worker", choices=["jax", "hf", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from autoglm_jax.quant.cli import layout_error

    for fmt, layout in (("int8", args.int8_layout), ("int4", args.int4_layout)):
        if message := layout_error(fmt, layout):
            p.error(message)
    also = [f for f in args.also_quant.split(",") if f]
    bad = [f for f in also if f not in ("int8", "int4")]
    if bad or (also and args.quant != "none"):
        p.error(f"--also-quant {args.also_quant!r}: formats from 'int8', 'int4', with a float --quant none run")
    if args.int8_layout != "kn" and "int8" not in (args.quant, *also):
        p.error(f"--int8-layout {args.int8_layout} is for --quant int8 (or --also-quant int8) only; got "
                f"--quant {args.quant!r}")
    if args.int4_layout != "kn" and "int4" not in (args.quant, *also):
        p.error(f"--int4-layout {args.int4_layout} is for --quant int4 (or --also-quant int4) only; got --quant "
                f"{args.quant!r}")
    if args.worker:
        work = {"jax": _jax_worker, "hf": _hf_worker, "memory": _memory_worker}[args.worker]
        if args.worker == "memory":  # spawn_worker's protocol (errors come back as {"error": ...})
            bench_common.write_worker_result(lambda: work(args), args.worker_out)
        else:
            Path(args.worker_out).write_text(json.dumps(work(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    jax_res = _spawn("jax", args, out / "_decode_jax.json") if "jax" in parts else None
    quant_res = {}
    for fmt in also if "jax" in parts else []:
        q_args = argparse.Namespace(**{**vars(args), "quant": fmt,
                                       "int8_layout": args.int8_layout if fmt == "int8" else "kn",
                                       "int4_layout": args.int4_layout if fmt == "int4" else "kn"})
        try:
            quant_res[fmt] = _spawn("jax", q_args, out / f"_decode_jax_{fmt}.json")
        except subprocess.CalledProcessError as e:  # the float run and the other formats still count
            print(f"--also-quant {fmt}: worker failed (exit {e.returncode}); continuing", flush=True)
    if "memory" in parts and args.quant != "none":  # the memory worker fills float parameters only
        print(f"memory part skipped: it measures float weights, not --quant {args.quant}", flush=True)
        parts.remove("memory")
    mem_res = _spawn_memory(args, out / "_decode_memory.json") if "memory" in parts else None
    hf_res = _spawn("hf", args, out / "_decode_hf.json") if "hf" in parts else None
    rows = ((jax_res["rows"] if jax_res else []) + [r for res in quant_res.values() for r in res["rows"]]
            + (hf_res["rows"] if hf_res else []))

    def pick(impl_prefix, batch, key):
        for r in rows:
            if r["impl"].startswith(impl_prefix) and r.get("batch") == batch and key in r:
                return r[key]
        return None

    summary = {}
    if jax_res:
        bw = jax_res["bandwidth"]
        summary.update(
            b1_ms_per_token=pick("autoglm_jax", 1, "ms_per_token"),
            b32_tokens_per_s=pick("autoglm_jax", 32, "tokens_per_s"),
            b32_decode_tokens_per_s=pick("autoglm_jax", 32, "decode_tokens_per_s"),
            roofline_b1_ms=1e3 * jax_res["param_bytes"] / bw if bw else None,
            copy_bandwidth_tb_s=bw / 1e12 if bw else None,
            param_gib=jax_res["param_bytes"] / 2**30,
            kv_cache_gib_b32=jax_res["kv_bytes_max_batch"] / 2**30,
            peak_gib=jax_res["peak_bytes"] / 2**30 if jax_res["peak_bytes"] else None,
            peak_after_init_gib=(jax_res["peak_bytes_after_init"] / 2**30
                                 if jax_res.get("peak_bytes_after_init") else None),
            layers=jax_res["layers"])
        if summary["roofline_b1_ms"] and summary["b1_ms_per_token"]:
            summary["b1_frac_of_roofline"] = summary["roofline_b1_ms"] / summary["b1_ms_per_token"]
            # the bytes a step reads: all parameters but the embedding table (gathered, B rows)
            summary["roofline_b1_read_ms"] = 1e3 * jax_res["read_bytes"] / bw
            summary["b1_frac_of_read_roofline"] = summary["roofline_b1_read_ms"] / summary["b1_ms_per_token"]
        if summary["peak_gib"] is not None:
            summary["peak_budget_gib"] = summary["param_gib"] + summary["kv_cache_gib_b32"] + 2.0
    for fmt, res in quant_res.items():
        b1 = next((r["ms_per_token"] for r in res["rows"] if r.get("batch") == 1), None)
        summary[f"{fmt}_b1_ms_per_token"] = b1
        summary[f"{fmt}_param_gib"] = res["param_bytes"] / 2**30
        if b1 and summary.get("b1_ms_per_token"):
            summary[f"{fmt}_b1_speedup"] = summary["b1_ms_per_token"] / b1
    if mem_res:
        summary["memory_worker"] = mem_res
        if mem_res.get("peak_bytes"):
            # the floor's figure: generation with programs loaded from the compilation cache (the cold run's
            # peak_gib above also holds XLA's autotuning buffers and the random initialiser's temporaries)
            summary["peak_gib_cold"] = summary.get("peak_gib")
            summary["peak_gib"] = mem_res["peak_bytes"] / 2**30
    if hf_res:
        summary.update(hf_static_b1_ms_per_token=pick("hf_static", 1, "ms_per_token"),
                       hf_static_b32_tokens_per_s=pick("hf_static", 32, "tokens_per_s"),
                       hf_static_b32_decode_tokens_per_s=pick("hf_static", 32, "decode_tokens_per_s"),
                       hf_dynamic_b1_ms_per_token=pick("hf_dynamic", 1, "ms_per_token"),
                       hf_dynamic_b32_tokens_per_s=pick("hf_dynamic", 32, "tokens_per_s"))
        if summary.get("b32_tokens_per_s") and summary.get("hf_static_b32_tokens_per_s"):
            summary["b32_speedup_vs_hf_static"] = summary["b32_tokens_per_s"] / summary["hf_static_b32_tokens_per_s"]
        if summary.get("b32_decode_tokens_per_s") and summary.get("hf_static_b32_decode_tokens_per_s"):
            summary["b32_decode_speedup_vs_hf_static"] = (summary["b32_decode_tokens_per_s"]
                                                          / summary["hf_static_b32_decode_tokens_per_s"])
        if summary.get("b1_ms_per_token") and summary.get("hf_static_b1_ms_per_token"):
            summary["b1_speedup_vs_hf_static"] = summary["hf_static_b1_ms_per_token"] / summary["b1_ms_per_token"]
    if args.reuse:
        summary["reused_parts"] = (f"{args.reuse}: read from worker files that an earlier call on the same machine "
                                   f"wrote to --out (bench_decode.py --reuse)")
    name = args.name or f"decode_{bench_common.gpu_tag()}"
    bench_common.write_results(out, name, rows=rows, summary=summary,
                               columns=["impl", "batch", "prompt", "new_tokens", "prefill_s", "ms_per_token",
                                        "tokens_per_s", "decode_tokens_per_s", "total_s", "generate_stream_total_s",
                                        "first_run_s"],
                               notes=__doc__)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
