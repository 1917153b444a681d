"""``autoglm quantize SRC OUT --method int8|int4|w8a8 ...``: post-training quantization to an Orbax checkpoint.

The output holds integer tensors and scales only (no float copy of a quantized weight), float parts in the
source's dtype, tokenizer files copied from SRC, and ``autoglm.json``'s ``quantization`` dict, so
``from_pretrained(OUT)`` and ``autoglm generate --model OUT`` load it directly. Everything that can be checked
without the weights (method, group size against every layer's K, observer, the calibration file, OUT) is
checked before loading; the write is atomic, so a failure leaves no partial OUT.

``--int8-layout nk`` (method int8 only) stores the int8 weights K-major, ``qweight[N, K]`` (served by XLA's int8
dot or the Pallas K-major tiles, as the tuned table says; default ``kn``: ``[K, N]``); ``auto`` picks per weight: nk unless K > N (so
GLM's down_proj stays kn). The checkpoint records it (``k_major`` in the ``quantization`` dict: true or
"auto"; absent = kn), so it loads back in the same layouts. ``--int4-layout nk`` (method int4 only) stores int4
weights K-major, ``packed[N, K/2]``: the layout of the GPU's one-row integer-dot kernel
(``kernels_pallas/qmatmul_dp4a.py``); ``auto`` does so for every weight since session 14 (it did so for wide
weights only, N >= 2 K, before: such checkpoints recorded "auto" and load with that rule); recorded the same way.

Calibration file (``--calib``): ``.jsonl`` (one JSON string or ``{"text": ...}`` per line, one sample each) or
plain text (tokenized whole and cut into ``--calib-seq-len`` windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

# --int8-layout / --int4-layout -> k_major: [K, N] (default), K-major [N, K], or per weight (resolve_k_major)
LAYOUTS = {"kn": False, "nk": True, "auto": "auto"}
_LAYOUT_WORDS = {"int8": ("qweight [K, N]", "[N, K]", "nk unless K > N"),
                 "int4": ("packed [K/2, N]", "[N, K/2]", "nk for every weight")}


def layout_error(fmt: str, layout: str) -> str | None:
    """The message for a ``--int8-layout`` / ``--int4-layout`` value that is not a layout, else None (the
    benchmarks that take these flags use it too)."""
    if layout in LAYOUTS:
        return None
    kn, nk, auto = _LAYOUT_WORDS[fmt]
    return (f"--{fmt}-layout {layout!r} is not a layout; allowed: 'kn' ({kn}, the default), 'nk' (K-major {nk}) "
            f"or 'auto' (per weight: {auto})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autoglm quantize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (HF or autoglm) or preset (e.g. tiny)")
    p.add_argument("out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--method", required=True, help="int8 (weight-only, per channel) | int4 (grouped) | w8a8")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along K: 64 or 128")
    p.add_argument("--asymmetric", action="store_true", help="int4: min/max ranges with zero points")
    p.add_argument("--observer", default="absmax",
                   help="absmax | percentile[:P] (default P=99.99) | mse: weight clip ranges, and the static "
                        "activation scales of w8a8 with --calib")
    p.add_argument("--act-observer", default=None, help="activation observer (default: --observer)")
    p.add_argument("--activations", choices=["dynamic", "static"], default=None,
                   help="w8a8: per-token dynamic scales, or static per-layer scales from --calib "
                        "(default: static when --calib is given)")
    p.add_argument("--calib", default=None, help="calibration text (.txt) or JSON lines (.jsonl)")
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--calib-batch", type=int, default=8)
    p.add_argument("--int8-layout", default="kn",
                   help="int8: kn (qweight [K, N], default), nk (K-major [N, K]) or auto "
                        "(per weight: nk unless K > N)")
    p.add_argument("--int4-layout", default="kn",
                   help="int4: kn (packed [K/2, N], default), nk (K-major [N, K/2], the GPU's one-row integer-dot "
                        "kernel) or auto (nk for every weight, the H100's fastest)")
    p.add_argument("--keep-float", default="lm_head",
                   help="comma-separated glob patterns of layers to keep float (path or name), e.g. "
                        "lm_head,layers.0.*,down_proj; '' for none")
    p.add_argument("--keep-indivisible", action="store_true",
                   help="int4: keep layers whose K is not a multiple of the group float instead of failing")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def read_calibration(path: str | Path, tokenizer, *, seq_len: int, max_samples: int) -> list[list[int]]:
    """Token samples from a calibration file; ``CalibrationError`` when it is missing or holds no tokens."""
    from .calibrate import CalibrationError

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CalibrationError(f"calibration file {path} is empty")
    samples: list[list[int]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{n}: not JSON ({e})") from None
            item = item.get("text") if isinstance(item, dict) else item
            if not isinstance(item, str):
                raise CalibrationError(f"{path}:{n}: expected a string or {{\"text\": string}}")
            ids = tokenizer.encode(item)
            if ids:
                samples.append(list(ids)[:seq_len])
            if len(samples) >= max_samples:
                break
    else:
        ids = list(tokenizer.encode(text))
        samples = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:max_samples]
    samples = [s for s in samples if s]
    if not samples:
        raise CalibrationError(f"calibration file {path} holds no tokens")
    return samples


def _source_dir(src: str) -> Path | None:
    from ..loading import EMBEDDED_DIR

    if Path(src).is_dir():
        return Path(src)
    if src == "tiny" and EMBEDDED_DIR.is_dir():
        return EMBEDDED_DIR
    return None


def _source_config(src: str):
    from ..checkpoint import orbax_io
    from ..config import PRESETS, GLMConfig

    d = _source_dir(src)
    if d is not None:
        if orbax_io.is_orbax_checkpoint(d):
            meta = orbax_io.read_marker(d)
            if meta.get("quantization"):
                raise ValueError(f"{d} is already quantized ({meta['quantization']}); quantize a float checkpoint")
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"{d} has no config.json (neither an HF nor an autoglm checkpoint)")
        return GLMConfig.from_json_file(d / "config.json")
    if src in PRESETS:
        return PRESETS[src]
    raise FileNotFoundError(f"{src!r} is neither a checkpoint directory nor a preset; presets: {sorted(PRESETS)}")


def quantize_main(argv: Sequence[str]) -> int:
    p = _parser()
    args = p.parse_args(argv)
    # ---- everything checkable before loading weights -----------------------------------------------------
    from flax import nnx

    from ..model import GLMForCausalLM
    from .calibrate import CalibrationError
    from .observers import ObserverError, parse_observer
    from .ptq import PTQConfig, PTQError, plan

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        p.error(f"{out} already exists; choose a new directory or pass --overwrite")
    activations = args.activations or ("static" if (args.calib and args.method == "w8a8") else "dynamic")
    if activations == "static" and not args.calib:
        p.error("--activations static needs --calib FILE (calibration text)")
    if args.calib and args.method != "w8a8":
        p.error(f"--calib calibrates static w8a8 activation scales; method {args.method!r} quantizes weights only")
    for fmt, layout in (("int8", args.int8_layout), ("int4", args.int4_layout)):
        if message := layout_error(fmt, layout):
            p.error(message)
        if layout != "kn" and args.method != fmt:
            p.error(f"--{fmt}-layout {layout} (an {fmt} weight layout) is for --method {fmt} only; "
                    f"got {args.method!r}")
    layout = args.int4_layout if args.method == "int4" else args.int8_layout
    try:
        keep = tuple(s.strip() for s in args.keep_float.split(",") if s.strip())
        cfg = PTQConfig(method=args.method, group=args.group_size, symmetric=not args.asymmetric,
                        activations=activations, weight_observer=parse_observer(args.observer),
                        act_observer=parse_observer(args.act_observer or args.observer), keep_float=keep,
                        keep_indivisible=args.keep_indivisible, k_major=LAYOUTS[layout])
        model_cfg = _source_config(args.src)
        abstract = nnx.eval_shape(lambda: GLMForCausalLM(model_cfg, rngs=nnx.Rngs(0)))
        plan(abstract, cfg, act_stats=None if activations == "dynamic" else _AllStats())
    except (PTQError, ObserverError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    tokenizer, samples = None, None
    if args.calib:
        from ..tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(_source_dir(args.src))
            samples = read_calibration(args.calib, tokenizer, seq_len=args.calib_seq_len,
                                       max_samples=args.calib_samples)
        except (CalibrationError, FileNotFoundError, OSError) as e:
            p.error(str(e))
        if max(max(s) for s in samples) >= model_cfg.vocab_size:
            p.error(f"the tokenizer produced ids >= the model's vocab_size {model_cfg.vocab_size}")

    # ---- the work ----------------------------------------------------------------------------------------
    from ..checkpoint.convert import save_pretrained
    from ..loading import from_pretrained
    from .calibrate import calibrate
    from .ptq import quantize

    t0 = time.perf_counter()
    model = from_pretrained(args.src, progress=not args.quiet)
    stats = None
    if activations == "static":
        stats = calibrate(model, samples, seq_len=args.calib_seq_len, batch_size=args.calib_batch,
                          max_samples=args.calib_samples, progress=not args.quiet)
    report = quantize(model, cfg, act_stats=stats)
    save_pretrained(model, out, side_files_from=_source_dir(args.src), quantization=report.quantization,
                    overwrite=args.overwrite,
                    extra_meta={"quantized_by": "autoglm quantize", "source": str(args.src),
                                "ptq": {"label": cfg.label, "weight_observer": cfg.weight_observer.name,
                                        "int8_layout": args.int8_layout if args.method == "int8" else None,
                                        "int4_layout": args.int4_layout if args.method == "int4" else None,
                                        "act_observer": cfg.act_observer.name if activations == "static" else None,
                                        "calibration": {"file": str(args.calib), "samples": len(samples)}
                                        if samples else None, "kept_float": report.kept_float}})
    print(report.summary(), file=sys.stderr)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


class _AllStats(dict):
    """Stands in for calibration statistics while planning (every layer 'has' them)."""

    def __contains__(self, key) -> bool:
        return True

    def __bool__(self) -> bool:
        return True
