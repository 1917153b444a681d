"""Shared by the benchmark scripts: device naming, versions, copy bandwidth, timing and result files."""

from __future__ import annotations

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


def measure_copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written.

    A large bf16 elementwise pass (one read and one write of every element), timed with calls pipelined
    (one block per sample of ``reps`` calls, so host dispatch hides behind device work); the median over
    five samples. The result is the roofline all benchmarks quote: measured the same way in every script.
    """
    import jax
    import jax.numpy as jnp

    n = nbytes // 2
    x = jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * 2)
    jax.block_until_ready(copy(x))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            y = copy(x)
        jax.block_until_ready(y)
        samples.append((time.perf_counter() - t) / reps)
    return 2 * n * 2 / statistics.median(samples)


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


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, *, rows: list[dict], summary: dict, columns: list[str],
                  extra: dict | None = None, notes: str = "", device: dict | None = None) -> Path:
    """Writes ``<name>.json`` (device, date, versions, rows, summary) and ``<name>.md`` beside it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"device": device or device_info(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "versions": versions(), "summary": summary, "rows": rows, **(extra or {})}
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


def spawn_worker(script: str | Path, argv: list[str], *, env: dict[str, str] | None = None,
                 timeout_s: float | None = None) -> dict:
    """Runs ``python script *argv --worker-out FILE`` in a fresh process; the dict it wrote, or ``{"error": ...}``.

    One process per measurement: the device's memory statistics (``peak_bytes_in_use`` is a high-water mark
    of the whole process that never resets) and an out-of-memory failure then belong to that measurement
    alone. The worker side is ``write_worker_result``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        try:
            code = subprocess.run([sys.executable, str(script), *argv, "--worker-out", str(out)], env=env,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"worker {' '.join(argv)} did not finish in {timeout_s} s"}
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


def write_worker_result(measure, out_path: str | Path) -> None:
    """In a worker: writes ``measure()``'s dict to ``out_path``, or ``{"error": ...}`` when it raises."""
    try:
        res = measure()
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
