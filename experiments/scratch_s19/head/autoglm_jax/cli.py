"""``autoglm``: the command line. ``autoglm COMMAND --help`` describes each command.

Each command is a function taking its own argv, so ``python -m autoglm_jax`` and ``autoglm`` are the same.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Sequence


def _generate(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autoglm generate",
                                description="Generate text, streamed to stdout, from a checkpoint or preset.")
    p.add_argument("--model", default="tiny",
                   help="HF or autoglm checkpoint directory, or a preset (default: the embedded tiny model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's dtype")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the model over N devices (tensor parallelism); under python -m sharding.launch "
                        "the devices of every process (the first one writes the text)")
    args = p.parse_args(argv)

    from sharding import initialize_distributed, launch

    from .generate import GenerationConfig, generate_stream
    from .loading import load_model_and_tokenizer
    from .tokenizer import TextStreamer

    if launch.ENV_COORDINATOR in os.environ:  # one of several processes (python -m sharding.launch)
        initialize_distributed()
    import jax

    out = sys.stdout if jax.process_index() == 0 else open(os.devnull, "w")  # one process writes the text

    try:
        gen_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    model, tok = load_model_and_tokenizer(args.model, dtype=args.dtype, tensor_parallel=args.tensor_parallel,
                                          note=lambda m: print(f"autoglm generate: {m}", file=sys.stderr))
    ids = tok.encode(args.prompt)
    if not ids:
        p.error("the prompt encodes to no tokens")
    if max(ids) >= model.cfg.vocab_size:
        p.error(f"the tokenizer produced id {max(ids)} >= the model's vocab_size {model.cfg.vocab_size}")
    if tok.eos_token_ids and gen_cfg.eos_token_ids is None:
        gen_cfg = GenerationConfig(**{**gen_cfg.__dict__, "eos_token_ids": tuple(tok.eos_token_ids)
                                      + tuple(model.cfg.eos_token_ids)})
    try:
        stream = generate_stream(model, [ids], gen_cfg)
        streamer = TextStreamer(tok)
        out.write(args.prompt)
        t0, n = time.perf_counter(), 0
        for step in stream:
            n += 1
            out.write(streamer.push(int(step[0])))
            out.flush()
    except ValueError as e:
        p.error(str(e))
    out.write("\n")
    if out is sys.stdout:
        print(f"[{n} tokens in {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    return 0


def _convert(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autoglm convert",
                                description="Convert a Hugging Face checkpoint (safetensors) to this project's "
                                            "Orbax layout, streamed tensor by tensor, written atomically.")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="parameter dtype to store (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    from .checkpoint.convert import convert_hf_to_orbax

    out = convert_hf_to_orbax(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _export(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="autoglm export",
                                description="Write Hugging Face safetensors back from an Orbax checkpoint.")
    p.add_argument("orbax_dir")
    p.add_argument("hf_dir")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-shard-gib", type=float, default=4.0)
    args = p.parse_args(argv)
    from .checkpoint.convert import export_orbax_to_hf

    out = export_orbax_to_hf(args.orbax_dir, args.hf_dir, overwrite=args.overwrite,
                             max_shard_bytes=int(args.max_shard_gib * 2**30))
    print(f"wrote {out}")
    return 0


def _memory(argv: Sequence[str]) -> int:
    from .memory import memory_main

    return memory_main(argv)


def _quantize(argv: Sequence[str]) -> int:
    from .quant.cli import quantize_main

    return quantize_main(argv)


def _serve(argv: Sequence[str]) -> int:
    from .server.main import serve_main

    return serve_main(argv)


def _serve_bench(argv: Sequence[str]) -> int:
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "experiments" / "bench_serving.py"
    if not script.exists():
        print("autoglm serve-bench: experiments/bench_serving.py is part of the source checkout, not the wheel; "
              "run it from a clone of the repository", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("bench_serving", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(argv)) or 0


COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "generate": (_generate, "generate text from a checkpoint or preset (streams to stdout)"),
    "convert": (_convert, "Hugging Face safetensors -> Orbax (streamed, atomic)"),
    "export": (_export, "Orbax -> Hugging Face safetensors (bit-exact for the same dtype)"),
    "memory": (_memory, "predict parameter / KV-cache / workspace memory before allocating"),
    "quantize": (_quantize, "post-training quantization (int8, int4, w8a8) to a quantized Orbax checkpoint"),
    "serve": (_serve, "OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /metrics)"),
    "serve-bench": (_serve_bench, "drive the serving engine with a benchmark workload (experiments/bench_serving.py)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "autoglm COMMAND [--help]\n\ncommands:\n" + "\n".join(
        f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"autoglm: unknown command {argv[0]!r}\n\n{usage}", file=sys.stderr)
        return 2
    from sharding.mesh import MeshError

    from .checkpoint.safetensors_io import CheckpointError
    from .config import ConfigError

    try:
        return COMMANDS[argv[0]][0](argv[1:]) or 0
    except (CheckpointError, ConfigError, MeshError, FileExistsError, FileNotFoundError) as e:
        print(f"autoglm {argv[0]}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
