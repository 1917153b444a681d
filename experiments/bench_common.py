"""Shared by the benchmark scripts: device naming, versions, copy bandwidth, timing and result files."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "kind": getattr(d, "device_kind", str(d)), "count": jax.device_count()}


def gpu_tag() -> str:
    """'h100', 'h200', ... from the device kind; 'cpu' without an accelerator."""
    kind = device_info()["kind"].lower()
    for tag in ("h200", "h100", "a100", "l4", "v5", "v6"):
        if tag in kind:
            return tag
    return "cpu" if "cpu" in kind else kind.replace(" ", "_")


def versions() -> dict:
    import importlib

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "transformers", "triton"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent packages are simply not listed
            pass
    return out


def measure_copy_bandwidth(nbytes: int = 4 << 30, reps: int = 10) -> float:
    """The memory roofline all benchmarks quote, in bytes/s: the faster of two XLA passes over ``nbytes`` of bf16.

    A copy (``a * 2``: one read and one write of every element, both counted) and a read-only pass (a column sum of
    the same array: the traffic of a decode step, which reads weights and writes little). Each is timed with calls
    pipelined (one block per sample of ``reps`` calls, so host dispatch hides behind device work), the median of
    five samples. On the H200 (session 27) XLA's copy moved 3.29 TB/s while the read-only pass read 4.31 and a
    PyTorch device-to-device copy 4.29: the copy alone understated the ceiling there (a decode step then read at 1.15
    of it). On the H100 the copy measured 2.9-3.0 TB/s (every H100 file quotes it); its read pass was not measured.
    """
    import jax
    import jax.numpy as jnp

    n = nbytes // 2 // 4096 * 4096  # elements, whole rows of 4096
    x = jax.random.normal(jax.random.key(0), (n // 4096, 4096), jnp.bfloat16)
    passes = ((jax.jit(lambda a: a * 2), 4 * n),  # bytes read + written
              (jax.jit(lambda a: jnp.sum(a.astype(jnp.float32), axis=0)), 2 * n))  # bytes read
    best = 0.0
    for fn, moved in passes:
        jax.block_until_ready(fn(x))
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                y = fn(x)
            jax.block_until_ready(y)
            samples.append((time.perf_counter() - t) / reps)
        best = max(best, moved / statistics.median(samples))
    return best


def time_fn(fn, *args, warmup: int = 3, reps: int = 20) -> float:
    """Median seconds of ``fn(*args)`` (blocking on the result)."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gpu_span_per_call(fn, *args, calls: int = 30, warmup: int = 5) -> float:
    """Median seconds of GPU time per call of a jitted ``fn``: from a ``jax.profiler`` trace of ``calls`` calls, each
    call's span from its first kernel's start to its last kernel's end (the gaps between its own kernels count; the
    host's time between calls does not). ``time_fn``'s wall time is host-bound wherever dispatching a call takes
    longer than its kernels run (the H100's int4 GEMVs: 15 us of kernels a layer, 16-26 us of wall time). Needs a
    GPU; each call must launch the same kernels."""
    from jax.profiler import ProfileData

    with traced(fn, *args, calls=calls, warmup=warmup) as xplane:
        events = sorted((e.start_ns, e.start_ns + e.duration_ns)
                        for plane in ProfileData.from_file(xplane).planes if "GPU" in plane.name
                        for line in plane.lines if line.name.lower().startswith("stream") for e in line.events)
    return statistics.median(call_spans(events, calls)) / 1e9


@contextlib.contextmanager
def traced(fn, *args, calls: int = 30, warmup: int = 5):
    """A ``jax.profiler`` trace of ``calls`` calls of ``fn`` (after ``warmup`` untraced ones): yields the path of its
    .xplane.pb file, which lives until the context ends."""
    import glob

    import jax

    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        jax.profiler.stop_trace()
        (xplane,) = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        yield xplane


def distinct_inputs(x, layers: int, key=None) -> list:
    """``x`` and ``layers - 1`` other random normal arrays of its shape and dtype: one input a layer, as in the
    model, for benchmarks that unroll several layers in one jit. With one ``x`` shared by the layers XLA computes
    any input-only work once for all of them (CSE) and may merge dots that share it: the int8 ``xla_split`` digits,
    the int4 GEMV's digit planes and W8A8's row quantization were timed at an eighth of their per-layer cost in the
    quantized-matmul file of record's runs before 2026-11-27 (``qmatmul_diag/s22_distinct_x/``). ``key``: where the
    others come from (default: one from x's leading size; pass distinct keys for inputs of the same shape)."""
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(1 + x.shape[0]) if key is None else key, layers - 1)
    return [x] + [jax.random.normal(kk, x.shape, jnp.float32).astype(x.dtype) for kk in keys]


def call_spans(events: list[tuple[int, int]], calls: int) -> list[int]:
    """(start, end) of every kernel of ``calls`` identical calls, sorted by start -> each call's span (its first
    kernel's start to its last kernel's end): the k-th run of len(events) / calls kernels is the k-th call."""
    per = len(events) // calls
    if per == 0 or per * calls != len(events):
        raise RuntimeError(f"gpu_span_per_call: {len(events)} GPU kernels traced for {calls} calls (needs a GPU and "
                           f"the same kernels every call)")
    return [max(e for _, e in events[i * per:(i + 1) * per]) - events[i * per][0] for i in range(calls)]


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, *, rows: list[dict], summary: dict, columns: list[str],
                  extra: dict | None = None, notes: str = "", device: dict | None = None,
                  versions_: dict | None = None) -> Path:
    """Writes ``<name>.json`` (device, date, versions, rows, summary) and ``<name>.md`` beside it; ``device`` and
    ``versions_`` (default: this process's) name the measuring machine when results are merged elsewhere."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"device": device or device_info(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "versions": versions_ or versions(), "summary": summary, "rows": rows, **(extra or {})}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    md = [f"# {name}", "", f"device: {payload['device']}  ", f"date: {payload['date']}  ",
          f"versions: {payload['versions']}", "", "## Summary", "",
          markdown_table([{"key": k, "value": v} for k, v in summary.items()], ["key", "value"]), "",
          "## Rows", "", markdown_table(rows, columns), ""]
    if notes:
        md += ["## Notes", "", notes, ""]
    (out_dir / f"{name}.md").write_text("\n".join(md))
    return out_dir / f"{name}.json"


def error_text(e: BaseException) -> str:
    """How a failed measurement is recorded in a result row."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def env_for_workers() -> dict[str, str]:
    """For a parent process that spawns measuring workers (``spawn_worker``): the environment to give them.

    Call it once, before jax touches a device here. From then on this process takes device memory as it
    needs it instead of preallocating 75% of the device, so the workers (given the environment as it was)
    still get theirs.
    """
    env = dict(os.environ)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


# For processes that only compile (AOT ``memory_analysis``): XLA's GPU autotuner picks among kernels for the
# same fusions, so what the step keeps alive does not depend on it (at most a GEMM's scratch workspace, MiBs),
# but profiling takes seconds per compile and device memory of its own (it can fail for want of it).
NO_AUTOTUNE = "--xla_gpu_autotune_level=0"


def with_xla_flags(env, *flags: str) -> str:
    """``env``'s XLA_FLAGS with ``flags`` appended (to set as XLA_FLAGS before jax initialises a backend)."""
    return " ".join([env.get("XLA_FLAGS", ""), *flags]).strip()


# A persistent compilation cache that keeps every executable, however small or quick to compile.
COMPILE_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def spawn_worker(script: str | Path, argv: list[str], *, env: dict[str, str] | None = None,
                 timeout_s: float | None = None, warm_compile_cache: bool = False) -> dict:
    """Runs ``python script *argv --worker-out FILE`` in a fresh process; the dict it wrote, or ``{"error": ...}``.

    One process per measurement: the device's memory statistics (``peak_bytes_in_use`` is a high-water mark
    of the whole process that never resets) and an out-of-memory failure then belong to that measurement
    alone. The worker side is ``write_worker_result``. A worker that runs past ``timeout_s`` is killed; what
    it had written to FILE by then (a worker may write partial results as it goes) comes back with the error.

    ``warm_compile_cache``: the worker runs twice over a persistent compilation cache of this call's own (a
    temporary folder; ``JAX_COMPILATION_CACHE_DIR`` and ``COMPILE_CACHE_ENV``): a warm-up pass that compiles
    and fills the cache (its result is dropped, unless it is an error, which is returned), then the measured
    pass, which loads its executables from the cache and so neither compiles nor autotunes. XLA's GPU
    autotuner allocates device memory of its own while it profiles kernels; without the warm-up that would
    be the process's peak, not the step. The measured result then also has ``compile_cache_hits`` and
    ``compile_cache_misses`` (counted in the worker), ``compile_cache_warm`` (True when it loaded every
    executable and compiled none) and ``warm_pass_wall_s`` (the warm-up process's wall time).
    """
    with tempfile.TemporaryDirectory() as tmp:
        warm_s = None
        if warm_compile_cache:
            env = {**(os.environ if env is None else env), **COMPILE_CACHE_ENV,
                   "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "jax_cache")}
            t0 = time.perf_counter()
            first = _run_worker(script, argv, env, timeout_s, Path(tmp) / "warm_up.json")
            warm_s = time.perf_counter() - t0
            if "error" in first:  # nothing compiled (or the step failed): the measured pass would fail alike
                return first
        res = _run_worker(script, argv, env, timeout_s, Path(tmp) / "worker.json")
        if warm_compile_cache and "error" not in res:
            res["compile_cache_warm"] = res.get("compile_cache_misses") == 0 and res.get("compile_cache_hits", 0) > 0
            res["warm_pass_wall_s"] = warm_s
        return res


def _run_worker(script, argv, env, timeout_s, out: Path) -> dict:
    """One run of a worker for ``spawn_worker``: the dict it wrote to ``out``, or one with "error"."""
    try:
        code = subprocess.run([sys.executable, str(script), *argv, "--worker-out", str(out)], env=env,
                              timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        partial = json.loads(out.read_text()) if out.exists() else {}
        return {**partial, "error": f"did not finish in {timeout_s} s: worker {' '.join(argv)}"}
    if code != 0 or not out.exists():
        return {"error": f"worker {' '.join(argv)} exited with code {code} and wrote no result"}
    return json.loads(out.read_text())


def write_doc(out_dir: str | Path, name: str, doc: dict, markdown: str, plot=None) -> Path:
    """Writes ``<name>.json`` (the document) and ``<name>.md``, then ``plot(<name>.png)`` if given; prints the
    Markdown. For scripts whose documents are shaped their own way (``write_results`` builds a standard one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=2))
    (out_dir / f"{name}.md").write_text(markdown)
    if plot is not None:
        plot(out_dir / f"{name}.png")
    print(markdown)
    return out_dir / f"{name}.json"


def rewrite_doc(out_dir: str | Path, name: str, markdown, plot=None) -> None:
    """Rewrites ``<name>.md`` (``markdown(doc)``) and, if given, ``plot(<name>.png, doc)`` from the existing
    ``<name>.json``, which stays as it is: a script's ``--replot``, with no device work."""
    out_dir = Path(out_dir)
    doc = json.loads((out_dir / f"{name}.json").read_text())
    (out_dir / f"{name}.md").write_text(markdown(doc))
    if plot is not None:
        plot(out_dir / f"{name}.png", doc)
    print(f"rewrote {out_dir / name}.md" + (" and .png" if plot is not None else ""))


def write_worker_result(measure, out_path: str | Path) -> None:
    """In a worker: writes ``measure()``'s dict to ``out_path``, or ``{"error": ...}`` when it raises.

    Under a persistent compilation cache (``JAX_COMPILATION_CACHE_DIR`` set, as ``spawn_worker`` does with
    ``warm_compile_cache``) the dict also gets ``compile_cache_hits`` / ``compile_cache_misses``: how many
    executables this process loaded from the cache and how many it compiled and wrote there.
    """
    counts = {"/jax/compilation_cache/cache_hits": 0, "/jax/compilation_cache/cache_misses": 0}
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax.monitoring

        def count(event, **_):
            if event in counts:
                counts[event] += 1
        jax.monitoring.register_event_listener(count)
    try:
        res = measure()
        if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            res = {**res, "compile_cache_hits": counts["/jax/compilation_cache/cache_hits"],
                   "compile_cache_misses": counts["/jax/compilation_cache/cache_misses"]}
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: recorded, the parent goes on
        res = {"error": error_text(e)}
    Path(out_path).write_text(json.dumps(res))


def pyplot_or_none():
    """matplotlib.pyplot on the Agg backend, or None (saying so) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written")
        return None
    return plt


def decode_read_bytes(model, param_bytes: int, tensor: int = 1) -> int:
    """Bytes a decode step reads per device: every parameter but the input embedding table, from which a step
    gathers only its B rows (with tied embeddings the LM head reads the table, so it counts). ``param_bytes`` and
    the table are per device when ``tensor`` > 1 (the table is split along D over the tensor axis)."""
    if model.cfg.tie_word_embeddings:
        return param_bytes
    return param_bytes - model.embed[...].nbytes // tensor
