"""HTTP serving benchmark: ``autoglm serve`` over loopback vs the same engine in process; server cold start.

Workload: ``bench_serving.workload`` (the serving benchmark's, same defaults and seed): ``--requests`` requests
sharing one ``--prefix``-token prompt prefix, ``--suffix`` unique tokens each, outputs of ``--min-out..--max-out``
tokens (greedy, EOS ignored), all at once and Poisson at ``--rate``. GLM-4-9B shapes, random weights.

Parts, each in its own process, one after the other on the same device (the engine config is the server's,
built by ``autoglm_jax.server.main.build_server`` from the same flags):

* ``engine``: ``LLM`` stepped in a plain loop (``bench_serving.serve``): the in-process baseline; then
  ``AsyncLLM`` (engine thread + asyncio consumers, no HTTP) on the same workload.
* ``http``: ``python -m autoglm_jax.server`` in a subprocess; a raw asyncio HTTP/1.1 client (no client
  library overhead) sends every request to ``/v1/completions`` as token ids with ``stream: true`` at its
  arrival time and reads the server-sent events (one chunk per token). TTFT = first token chunk - arrival,
  ITL = gaps between token chunks, throughput = output tokens / (last token - first arrival). Prefix hit
  rate, preemptions and pages left in use come from ``/metrics`` after the run.
* ``cold``: process start -> server ready -> first streamed token of one request, with an empty jax
  compilation cache (cold) and again with the cache it left (warm); ``--cold-reps`` of each.

Floor: HTTP all-at-once throughput >= 0.9 x in-process (``http_vs_engine`` in the summary). Each part first
serves a few priming requests (another seed, so another prefix) so that first executions are not measured.

What the persistent compilation cache saves: XLA compilation only. A warm start still traces and lowers every
warmed-up step shape in Python (on the CPU here about 1 s per shape for the tiny model, measured with
cProfile: ~45% tracing, ~30% lowering, the rest running each shape once), so the warm start grows with the
number of buckets: serve with only the buckets the workload needs (``--token-buckets`` / ``--seq-buckets``).

    python experiments/bench_server.py                                  # GPU: server_<gpu>.json/.md
    python experiments/bench_server.py --tiny --out /tmp/server_smoke   # CPU smoke (embedded tiny model)
    python experiments/bench_server.py --tiny --parts cold --cold-reps 3 --name server_cold_start_cpu

The device image may lack the server's packages; from a machine with PyPI, bring wheels along and install
them there first (they are small)::

    pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d wheels \\
        starlette uvicorn pydantic prometheus-client jinja2
    # on the device: pip install --no-index --find-links wheels starlette uvicorn pydantic prometheus-client jinja2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_common  # noqa: E402
import bench_serving  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# ---- the server process -------------------------------------------------------------------------------------
def server_flags(args, port: int, cache: str) -> list[str]:
    f = ["--model", args.model, "--port", str(port), "--host", "127.0.0.1", "--compilation-cache", cache,
         "--max-model-len", str(args.prefix + args.suffix + args.max_out), "--page-size", str(args.page_size),
         "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
         "--token-buckets", ",".join(map(str, args.token_buckets)), "--seq-buckets",
         ",".join(map(str, args.seq_buckets)), "--warmup", "greedy", "--max-concurrency", str(4 * args.requests),
         "--served-model-name", "bench"]
    if args.dtype:
        f += ["--dtype", args.dtype]
    if args.num_pages:
        f += ["--num-pages", str(args.num_pages)]
    return f


class Server:
    def __init__(self, flags: list[str]):
        self.t0 = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen([sys.executable, "-m", "autoglm_jax.server", *flags], stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        self.log: list[str] = []
        self.ready_s = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in iter(self.proc.stderr.readline, ""):
            self.log.append(line)
            sys.stderr.write("  [server] " + line)
            if "ready in" in line and self.ready_s is None:
                self.ready_s = time.perf_counter() - self.t0

    def wait_ready(self, timeout: float = 1800) -> float:
        deadline = time.monotonic() + timeout
        while self.ready_s is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "".join(self.log[-30:]))
            time.sleep(0.02)
        return self.ready_s

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a minimal asyncio HTTP/1.1 + SSE client ------------------------------------------------------------------
async def stream_completion(port: int, body: dict, on_chunk) -> int:
    """POSTs ``body`` to /v1/completions (stream) and calls ``on_chunk(event_dict)`` per data event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(data) + data)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        chunked |= k.strip().lower() == "transfer-encoding" and "chunked" in v.lower()
    buf = b""
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            piece = await reader.readexactly(size)
            await reader.readexactly(2)
        else:
            piece = await reader.read(65536)
            if not piece:
                break
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: ") and event != b"data: [DONE]":
                on_chunk(json.loads(event[6:]))
    writer.close()
    return status


async def http_pattern(port: int, requests, *, tag: str) -> dict:
    import numpy as np

    t0 = time.perf_counter()
    per = []

    async def one(arrival, prompt, n):
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        times, usage = [], {}

        def on_chunk(ev):
            if ev.get("choices"):
                times.append(time.perf_counter())
            if ev.get("usage"):
                usage.update(ev["usage"])
        status = await stream_completion(port, {"model": "bench", "prompt": prompt, "max_tokens": n, "stream": True,
                                                "temperature": 0, "ignore_eos": True,
                                                "stream_options": {"include_usage": True}}, on_chunk)
        per.append((status, t0 + arrival, times, usage.get("completion_tokens", 0), n))

    await asyncio.gather(*(one(*r) for r in requests))
    end = max(t[-1] for _, _, t, _, _ in per if t)
    out_tokens = sum(u for *_, u, _ in per)
    ttft = [t[0] - a for _, a, t, _, _ in per if t]
    itl = [x for *_, t, _, _ in per for x in np.diff(t)]
    return dict(impl="http", pattern=tag, requests=len(per), ok=sum(s == 200 and u == n for s, _, _, u, n in per),
                output_tokens=out_tokens, wall_s=end - t0, throughput_tok_s=out_tokens / (end - t0),
                **{f"ttft_{k}_s": v for k, v in bench_serving.percentiles(ttft).items()},
                **{f"itl_{k}_ms": 1e3 * v for k, v in bench_serving.percentiles(itl).items() if v is not None})


def scrape(port: int) -> dict:
    import urllib.request

    from autoglm_jax.server.metrics import parse_metrics

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return parse_metrics(r.read().decode())


def priming(args):
    """A few requests with another seed (another prefix): the first executions of every program happen here,
    not in the measured runs, in each part alike."""
    import copy

    a = copy.copy(args)
    a.seed, a.requests, a.min_out, a.max_out = args.seed + 1, min(args.requests, args.max_num_seqs), 2, 4
    return bench_serving.workload(a, args.vocab)["all_at_once"]


def http_part(args) -> dict:
    port, cache = free_port(), args.cache or tempfile.mkdtemp(prefix="autoglm_jax_cache_")
    srv = Server(server_flags(args, port, cache))
    try:
        ready = srv.wait_ready()
        asyncio.run(http_pattern(port, priming(args), tag="priming"))
        rows = []
        for tag, reqs in bench_serving.workload(args, args.vocab).items():
            m0 = scrape(port)
            row = asyncio.run(http_pattern(port, reqs, tag=tag))
            m1 = scrape(port)
            looked = m1["autoglm_prefix_cache_lookup_tokens_total"] - m0["autoglm_prefix_cache_lookup_tokens_total"]
            hit = m1["autoglm_prefix_cache_hit_tokens_total"] - m0["autoglm_prefix_cache_hit_tokens_total"]
            row.update(prefix_hit_rate=hit / looked if looked else 0.0,
                       preemptions=m1["autoglm_preemptions_total"] - m0["autoglm_preemptions_total"],
                       pages_in_use_after=m1["autoglm_kv_pages_in_use"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        code = srv.stop()
    return dict(rows=rows, ready_s=ready, exit_code=code, shutdown_log=[x for x in srv.log if "shut down" in x])


# ---- in process -----------------------------------------------------------------------------------------------
async def async_pattern(engine, requests, *, tag: str) -> dict:
    import numpy as np

    from autoglm_jax.engine import SamplingParams

    t0 = time.perf_counter()
    per = []

    async def one(i, arrival, prompt, n):
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        times = []
        async for out in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                         request_id=f"{tag}-{i}"):
            times += [time.perf_counter()] * len(out.new_token_ids)
        per.append((t0 + arrival, times))

    await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))
    end = max(t[-1] for _, t in per)
    out_tokens = sum(len(t) for _, t in per)
    return dict(impl="async_llm", pattern=tag, requests=len(per), output_tokens=out_tokens, wall_s=end - t0,
                throughput_tok_s=out_tokens / (end - t0),
                **{f"ttft_{k}_s": v for k, v in bench_serving.percentiles([t[0] - a for a, t in per]).items()},
                **{f"itl_{k}_ms": 1e3 * v for k, v in
                   bench_serving.percentiles([x for _, t in per for x in np.diff(t)]).items() if v is not None})


def engine_part(args) -> dict:
    from autoglm_jax.server.main import build_parser, build_server

    sargs = build_parser().parse_args(server_flags(args, 0, args.cache or "none"))
    app, report = build_server(sargs, log=lambda m: print(m, flush=True))
    engine = app.state.server.engine  # AsyncLLM
    llm = engine.engine
    rows = []
    bench_serving.serve(llm, priming(args), tag="priming")
    work = bench_serving.workload(args, args.vocab)
    for tag, reqs in work.items():
        rows.append(dict(impl="engine", **bench_serving.serve(llm, reqs, tag=f"engine-{tag}")))
        rows[-1]["pattern"] = tag
        print(json.dumps(rows[-1]), flush=True)
    for tag, reqs in work.items():
        rows.append(asyncio.run(async_pattern(engine, reqs, tag=f"async-{tag}")))
        rows[-1]["pattern"] = tag
        print(json.dumps(rows[-1]), flush=True)
    engine.shutdown()
    return dict(rows=rows, report=report)


# ---- cold start -------------------------------------------------------------------------------------------------
def first_token_s(port: int, t0: float) -> float:
    got = []
    asyncio.run(stream_completion(port, {"model": "bench", "prompt": [1, 2, 3, 4], "max_tokens": 2, "stream": True,
                                         "temperature": 0},
                                  lambda ev: got.append(time.perf_counter()) if ev.get("choices") else None))
    return got[0] - t0


def cold_flags(args, config: str, port: int, cache: str) -> list[str]:
    """``bench``: the throughput runs' server (greedy shapes of its buckets); ``defaults``: ``autoglm serve``'s
    own defaults (every shape of the default buckets)."""
    if config == "bench":
        return server_flags(args, port, cache)
    return ["--model", args.model, "--port", str(port), "--compilation-cache", cache, "--served-model-name", "bench"]


def cold_part(args) -> dict:
    rows = []
    for config, rep in [(c, r) for c in (("defaults", "bench") if args.tiny else ("bench",))
                        for r in range(args.cold_reps)]:
        cache = tempfile.mkdtemp(prefix="autoglm_jax_cold_")
        for state in ("cold", "warm"):
            port = free_port()
            srv = Server(cold_flags(args, config, port, cache))
            try:
                ready = srv.wait_ready()
                ttft = first_token_s(port, srv.t0)
            finally:
                srv.stop()
            report = next((x for x in srv.log if "warmup_s=" in x), "")
            fields = dict(kv.split("=", 1) for kv in report.split() if "=" in kv)
            rows.append(dict(impl="cold_start", pattern=config, cache=state, rep=rep, process_start_to_ready_s=ready, process_start_to_first_token_s=ttft,
                             load_s=float(fields.get("load_s", "nan")), warmup_s=float(fields.get("warmup_s", "nan")),
                             warmup_shapes=int(fields.get("warmup_shapes", 0))))
            print(json.dumps(rows[-1]), flush=True)
    return dict(rows=rows)


def _median(xs):
    import statistics

    return statistics.median(xs) if xs else None


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: embedded tiny model, small workload")
    p.add_argument("--out", default=str(bench_common.RESULTS))
    p.add_argument("--name", default=None, help="result file name (default server_<gpu>)")
    p.add_argument("--parts", default="engine,http,cold")
    p.add_argument("--model", default="glm-4-9b")
    p.add_argument("--dtype", default="bfloat16")
    bench_serving.add_workload_args(p)
    p.add_argument("--cache", default=None, help="compilation cache for engine/http (default: a fresh temp dir)")
    p.add_argument("--cold-reps", type=int, default=1)
    p.add_argument("--worker", choices=["engine"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model, args.dtype, args.requests, args.prefix, args.suffix = "tiny", None, 24, 48, 16
        args.min_out, args.max_out, args.rate, args.max_num_seqs = 4, 8, 50.0, 8
        args.max_num_batched_tokens, args.token_buckets, args.seq_buckets = 128, [128], [8]
        args.num_pages = args.num_pages or 256
    from autoglm_jax.config import PRESETS

    args.vocab = PRESETS["tiny" if args.model == "tiny" else args.model].vocab_size
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(engine_part(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts, res = args.parts.split(","), {}
    if "engine" in parts:
        f = out / "_server_engine.json"
        cmd = [sys.executable, __file__, *argv, "--worker", "engine", "--worker-out", str(f)]
        code = subprocess.run(cmd).returncode
        res["engine"] = json.loads(f.read_text()) if code == 0 else None
    if "http" in parts:
        res["http"] = http_part(args)
    if "cold" in parts:
        res["cold"] = cold_part(args)
    rows = [r for k in ("engine", "http") if res.get(k) for r in res[k]["rows"]]
    cold_rows = res["cold"]["rows"] if res.get("cold") else []

    def tput(impl, pattern="all_at_once"):
        return next((r["throughput_tok_s"] for r in rows if r["impl"] == impl and r["pattern"] == pattern), None)

    def ratio(a, b):
        return a / b if a and b else None

    def cold(state, key, config="bench"):
        return _median([r[key] for r in cold_rows if r["cache"] == state and r["pattern"] == config])

    eng, http = tput("engine"), tput("http")
    summary = dict(
        http_vs_engine=ratio(http, eng), async_vs_engine=ratio(tput("async_llm"), eng),
        http_vs_engine_poisson=ratio(tput("http", "poisson"), tput("engine", "poisson")),
        floor_http_vs_engine=0.9 if http else None, engine_throughput_tok_s=eng, http_throughput_tok_s=http,
        http_failed_requests=sum(r["requests"] - r["ok"] for r in rows if r["impl"] == "http") if http else None,
        http_pages_in_use_after=max((r["pages_in_use_after"] for r in rows if r["impl"] == "http"), default=None),
        cold_start_to_first_token_s=cold("cold", "process_start_to_first_token_s"),
        warm_start_to_first_token_s=cold("warm", "process_start_to_first_token_s"),
        cold_start_to_ready_s=cold("cold", "process_start_to_ready_s"),
        warm_start_to_ready_s=cold("warm", "process_start_to_ready_s"),
        cold_warmup_s=cold("cold", "warmup_s"), warm_warmup_s=cold("warm", "warmup_s"),
        defaults_cold_start_to_first_token_s=cold("cold", "process_start_to_first_token_s", "defaults"),
        defaults_warm_start_to_first_token_s=cold("warm", "process_start_to_first_token_s", "defaults"),
        defaults_cold_warmup_s=cold("cold", "warmup_s", "defaults"),
        defaults_warm_warmup_s=cold("warm", "warmup_s", "defaults"))
    if res.get("http"):
        summary["http_server_exit_code"] = res["http"]["exit_code"]
    summary = {k: v for k, v in summary.items() if v is not None}
    name = args.name or f"server_{bench_common.gpu_tag()}"
    bench_common.write_results(
        out, name, rows=rows + cold_rows, summary=summary,
        columns=["impl", "pattern", "requests", "output_tokens", "wall_s", "throughput_tok_s", "ttft_p50_s",
                 "ttft_p99_s", "itl_p50_ms", "itl_p99_ms", "prefix_hit_rate", "preemptions", "cache",
                 "process_start_to_ready_s", "process_start_to_first_token_s", "load_s", "warmup_s", "warmup_shapes"],
        extra={"command": "python experiments/bench_server.py " + " ".join(argv),
               "args": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")},
               "parts": {k: ({kk: vv for kk, vv in v.items() if kk != "rows"} if v else None) for k, v in res.items()}},
        notes=__doc__)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
