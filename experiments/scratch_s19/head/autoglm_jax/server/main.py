"""``autoglm serve``: load a model, compile its step shapes, serve the OpenAI API over HTTP (uvicorn).

Cold start: jax's persistent compilation cache is on by default, in ``~/.cache/autoglm/jax``
(``$AUTOGLM_CACHE_DIR/jax`` when set; ``--compilation-cache DIR`` to move it, ``none`` to turn it off), and
every program is cached however fast it compiled. Before the port opens the engine compiles the step shapes
it can use -- only those: its ``--token-buckets`` / ``--seq-buckets`` (``LLM.warmup``) -- so no request waits
for a compile; a second start with the same model and flags loads them from the cache. The log line
``ready in X s`` counts from process start.

Shutdown (SIGINT / SIGTERM): the port closes, in-flight responses get ``--shutdown-timeout`` seconds to
finish, then the rest are cancelled (their requests aborted); the engine stops holding no KV pages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence


def default_cache_dir() -> Path:
    root = os.environ.get("AUTOGLM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autoglm")
    return Path(root) / "jax"


def process_uptime() -> float:
    """Seconds since this process started (from /proc where it exists, else since this module loaded)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = float(Path("/proc/uptime").read_text().split()[0])
        return boot - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _LOADED


_LOADED = time.monotonic()


def enable_compilation_cache(directory: str | os.PathLike | None) -> Path | None:
    import jax

    if directory is None or str(directory).lower() == "none":
        return None
    path = Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoglm serve", description="Serve a model over the OpenAI HTTP API.")
    p.add_argument("--model", default="tiny", help="checkpoint directory or preset (default: the embedded tiny model)")
    p.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: "
                   "the directory's name, or the preset)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-concurrency", type=int, default=256, metavar="N",
                   help="requests in flight (running + queued); one more is answered 429 with Retry-After")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="shard the model and the KV pages "
                   "over N devices (tensor parallelism)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None, help="context per request (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests per engine step")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: what memory allows)")
    p.add_argument("--kv-dtype", default=None, choices=["bfloat16", "float16", "float32", "int8"])
    p.add_argument("--token-buckets", type=_ints, default=None, help="padded token counts of mixed steps, "
                   "e.g. 64,256,512 (default: powers of two)")
    p.add_argument("--seq-buckets", type=_ints, default=None, help="padded batch sizes of decode steps")
    p.add_argument("--warmup", choices=["all", "greedy", "none"], default="all",
                   help="compile before serving: every step shape, only the greedy ones, or none")
    p.add_argument("--compilation-cache", default=str(default_cache_dir()), metavar="DIR",
                   help="jax persistent compilation cache ('none' turns it off; default: %(default)s)")
    p.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template (default: the "
                   "checkpoint's, else the GLM-4 fallback; see autoglm_jax/server/chat_template.py)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight responses get to "
                   "finish on shutdown before they are cancelled")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    return p


def build_server(args, *, log=print):
    """(app, startup report) from parsed arguments: cache, model, tokenizer, engine, warm-up."""
    cache = enable_compilation_cache(args.compilation_cache)
    from ..engine import AsyncLLM, LLM
    from ..loading import checkpoint_dir, load_model_and_tokenizer
    from .app import create_app
    from .chat_template import ChatTemplate

    t0 = time.perf_counter()
    mesh = None
    if args.tensor_parallel > 1:
        from sharding import make_mesh

        mesh = make_mesh(tensor=args.tensor_parallel)  # MeshError (a ValueError) before loading
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel,
                                                note=log)
    llm = LLM(model, tokenizer=tokenizer, num_pages=args.num_pages, page_size=args.page_size,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, kv_dtype=args.kv_dtype, token_buckets=args.token_buckets,
              seq_buckets=args.seq_buckets, model_key=str(args.model), mesh=mesh)
    t_load = time.perf_counter() - t0
    shapes = 0
    if args.warmup != "none":
        shapes = llm.warmup(sampled=args.warmup == "all")
    t_warm = time.perf_counter() - t0 - t_load
    model_dir = checkpoint_dir(args.model)
    template = ChatTemplate.from_checkpoint(model_dir, args.chat_template)
    name = args.served_model_name or (Path(args.model).name if model_dir is not None else str(args.model))
    app = create_app(AsyncLLM(llm), tokenizer, model_name=name, chat_template=template,
                     max_concurrency=args.max_concurrency, log=lambda m: log(m))
    report = {"model": name, "load_s": round(t_load, 3), "warmup_s": round(t_warm, 3), "warmup_shapes": shapes,
              "compilations": llm.num_compilations, "compilation_cache": str(cache) if cache else None,
              "chat_template": template.origin, "tensor_parallel": args.tensor_parallel,
              "num_pages": llm.memory["num_pages"],
              "max_model_len": llm.scheduler.config.max_model_len}
    return app, report


_GIL_SWITCH_INTERVAL_S = 0.0005


def serve_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_concurrency < 1:
        build_parser().error("--max-concurrency must be >= 1")

    def log(msg):
        print(f"autoglm serve: {msg}", file=sys.stderr, flush=True)

    import uvicorn

    # The engine thread and the event loop share the GIL; at Python's default 5 ms switch interval the
    # engine thread can wait that long for it after each device step while the loop streams chunks.
    sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
    try:
        app, report = build_server(args, log=log)
    except ValueError as e:
        log(f"error: {e}")
        return 2
    log("  ".join(f"{k}={v}" for k, v in report.items()))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            timeout_graceful_shutdown=args.shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    _startup = server.startup

    async def startup(sockets=None):
        await _startup(sockets)
        log(f"ready in {process_uptime():.2f} s on http://{args.host}:{args.port}")

    server.startup = startup
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(serve_main())
