"""Held-out perplexity of the embedded tiny model under every quantization this project runs (CPU).

    python experiments/quant_quality.py            # ~10-15 min on 2 busy CPU cores

Data: the held-out stdlib modules of ``experiments/train_tiny.py`` (never seen in training), tokenized with the
embedded tokenizer, the first ``--eval-tokens`` tokens scored in windows of 256 (the same windows for every
row). Calibration (static W8A8) and QAT use training-split modules only.

Rows: float32 compute (the shipped bfloat16 weights), bf16, fp16; int8 weight-only; int4 g128/g64 sym/asym
(PTQ, absmax and MSE weight observers); W8A8 dynamic per-token; W8A8 static with each activation observer;
QAT int4 g128 (a short LSQ fine-tune through ``autoglm_jax.train``'s step, exported to real int4 weights) beside
a float fine-tune with the same data, steps and learning rate (the control: the tiny model is under-trained,
so fine-tuning alone moves perplexity), and the same for a harder int4 setting with the LM head quantized too;
int8 KV cache (k and v quantized per token per head with
``kernels_pallas.kv_pages.quantize_kv`` and dequantized in the dense attention path -- the engine's int8 page
format, not the paged kernel). Quantized rows run the bf16 model's compute dtype through ``quantized_matmul``'s
CPU reference path. int4: the MLP down projections (K = 688, not a multiple of 64/128) stay bfloat16.

Writes experiments/results/quant_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from autoglm_jax.loading import EMBEDDED_DIR, from_pretrained  # noqa: E402
from autoglm_jax.model.attention_ops import causal_mask, gqa_attention  # noqa: E402
from autoglm_jax.quant import PTQConfig, calibrate, quantize  # noqa: E402
from autoglm_jax.quant.qat import qat_export, qat_train  # noqa: E402
from autoglm_jax.train import (ScannedGLM, TokenBatches, TrainConfig, eval_batches, params_from_model,  # noqa: E402
                               pack_documents, train)
from kernels_pallas.kv_pages import dequantize_kv, quantize_kv  # noqa: E402

RESULTS = REPO / "experiments" / "results"
SEQ = 256


class Int8KVDense:
    """A cache stand-in for the cache-free forward: k, v through int8 (per token per head) and back, then causal
    dense attention over the T tokens given."""

    def attend(self, layer, q, k, v, positions, *, scale):
        kq = dequantize_kv(*quantize_kv(k), dtype=k.dtype)
        vq = dequantize_kv(*quantize_kv(v), dtype=v.dtype)
        t = q.shape[1]
        mask = jnp.broadcast_to(causal_mask(t, t), (q.shape[0], t, t))
        return gqa_attention(q, kq, vq, mask, scale=scale), self


def perplexity(model, batches, *, int8_kv: bool = False) -> dict:
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, tokens, mask):
        m = nnx.merge(graphdef, state)
        inputs = tokens[:, :-1]
        logits = m(inputs, cache=Int8KVDense())[0] if int8_kv else m(inputs)
        logits = logits.astype(jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        w = mask[:, 1:]
        return jnp.sum((logz - tgt) * w), jnp.sum(w)

    t0 = time.perf_counter()
    total = count = 0.0
    for tokens, mask in batches:
        a, b = nll(state, jnp.asarray(tokens), jnp.asarray(mask))
        total, count = total + float(a), count + float(b)
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": int(count),
            "eval_s": time.perf_counter() - t0}


def cast_model(model, dtype: str):
    return ScannedGLM.create(model.cfg).to_model(params_from_model(model), dtype=dtype)


def linear_bytes(model) -> int:
    from autoglm_jax.quant.calibrate import iter_linears
    total = 0
    for *_, layer in iter_linears(model):
        if hasattr(layer, "kernel"):
            total += layer.kernel[...].nbytes
        else:
            total += layer.weight().nbytes()
    return total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens scored (65437 = all)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--qat-steps", type=int, default=48)
    ap.add_argument("--qat-batch", type=int, default=8)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--train-files-stride", type=int, default=8, help="tokenize every n-th training module")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--quick", action="store_true", help="a smoke run: few tokens and steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.eval_tokens, args.calib_samples, args.qat_steps = 2048, 8, 2
    t_start = time.perf_counter()
    from tokenizers import Tokenizer
    from train_tiny import HELD_OUT, read, stdlib_files

    tok = Tokenizer.from_file(str(EMBEDDED_DIR / "tokenizer.json"))
    train_paths, held_paths = stdlib_files()
    held = pack_documents([e.ids for e in tok.encode_batch(read(held_paths))], eos_id=0)[: args.eval_tokens + 1]
    train_stream = pack_documents([e.ids for e in tok.encode_batch(read(train_paths[::args.train_files_stride]))],
                                  eos_id=0)
    batches = list(eval_batches(held, seq_len=SEQ, batch_size=8))
    calib = [train_stream[i * SEQ:(i + 1) * SEQ] for i in range(args.calib_samples)]
    print(f"held-out tokens scored: {len(held) - 1}; train-sample stream {len(train_stream)} tokens", flush=True)

    base = from_pretrained("tiny")  # bfloat16 weights, bfloat16 compute
    f32 = cast_model(base, "float32")
    rows = []

    def row(name, model, **extra):
        r = perplexity(model, batches, int8_kv=extra.pop("int8_kv", False))
        r.update(name=name, linear_bytes=linear_bytes(model), **extra)
        rows.append(r)
        print(f"{name:<34} ppl {r['ppl']:9.3f}  ({r['eval_s']:.0f} s)", flush=True)
        return r

    row("fp32 compute (bf16 weights)", f32, method="float")
    bf16 = row("bf16", base, method="float")
    row("fp16", cast_model(base, "float16"), method="float")
    row("int8 KV cache (bf16 model)", base, method="kv", int8_kv=True)

    stats = calibrate(base, calib, seq_len=SEQ, batch_size=8, max_samples=args.calib_samples, progress=False)
    ptq = [PTQConfig(method="int8"),
           PTQConfig(method="int8", weight_observer="mse"),
           PTQConfig(method="int4", group=128, keep_indivisible=True),
           PTQConfig(method="int4", group=128, keep_indivisible=True, weight_observer="mse"),
           PTQConfig(method="int4", group=128, symmetric=False, keep_indivisible=True),
           PTQConfig(method="int4", group=64, keep_indivisible=True),
           PTQConfig(method="w8a8"),
           *[PTQConfig(method="w8a8", activations="static", act_observer=o)
             for o in ("absmax", "percentile:99.99", "percentile:99.9", "mse")]]
    reports = {}
    for cfg in ptq:
        model = nnx.clone(base)
        rep = quantize(model, cfg, act_stats=stats)
        reports[cfg.label] = rep
        row(cfg.label, model, method=cfg.method, kept_float=sorted(rep.kept_float),
            mean_weight_rel_error=float(np.mean(list(rep.weight_rel_error.values()))))

    # QAT int4 g128 and its control (float fine-tune, same data / steps / schedule)
    tc = TrainConfig(seq_len=SEQ, batch_size=args.qat_batch, total_steps=args.qat_steps,
                     warmup_steps=max(1, args.qat_steps // 10), learning_rate=args.qat_lr, min_lr_ratio=0.1,
                     weight_decay=0.0, grad_clip_norm=1.0, log_every=max(1, args.qat_steps // 8), seed=1)
    data = TokenBatches(train_stream, seq_len=SEQ, batch_size=args.qat_batch, seed=1)
    qcfg = PTQConfig(method="int4", group=128, keep_indivisible=True)
    hard = PTQConfig(method="int4", group=128, keep_indivisible=True, keep_float=())  # the LM head in int4 too
    t0 = time.perf_counter()
    ctrl = train(f32.cfg, tc, data, init_params=jax.tree.map(jnp.copy, params_from_model(f32)), progress=False)
    ctrl_s = time.perf_counter() - t0
    ft = ctrl.model(dtype="bfloat16")
    ft_row = row("control: bf16 after float fine-tune", ft, method="float", train_s=ctrl_s)
    qat_rows, ft_ptq_rows = {}, {}
    for tag, cfg in (("", qcfg), (" +lm_head", hard)):
        if tag:
            model = nnx.clone(base)
            quantize(model, cfg)
            row(f"{cfg.label} (lm_head int4 too)", model, method="int4")
        t0 = time.perf_counter()
        res = qat_train(f32, cfg, tc, data, progress=False)
        qat_s = time.perf_counter() - t0
        qmodel, qdict = qat_export(res.fwd, res.state.params, dtype="bfloat16")
        qat_rows[tag] = row(f"qat {cfg.label}{tag}", qmodel, method="int4", train_s=qat_s, history=res.history,
                            quantization=qdict)
        ft_q = nnx.clone(ft)
        quantize(ft_q, cfg)
        ft_ptq_rows[tag] = row(f"control: {cfg.label}{tag} PTQ of the fine-tune", ft_q, method="int4")
    qat_row, ft_ptq_row = qat_rows[""], ft_ptq_rows[""]

    by = {r["name"]: r for r in rows}
    w8a8 = [r for r in rows if r["name"].startswith("w8a8")]
    best_w8a8 = min(w8a8, key=lambda r: r["ppl"])
    int4 = by["int4_g128_sym"]["ppl"]
    b = bf16["ppl"]
    recovered = (int4 - qat_row["ppl"]) / (int4 - b) if int4 > b else float("nan")
    recovered_vs_ft = _recovered(ft_ptq_row["ppl"], qat_row["ppl"], ft_row["ppl"])
    summary = {
        "bf16_ppl": b, "fp16_ppl": by["fp16"]["ppl"], "fp32_ppl": by["fp32 compute (bf16 weights)"]["ppl"],
        "int8_wo_ppl": by["int8"]["ppl"], "int4_ptq_ppl": int4, "best_w8a8_ppl": best_w8a8["ppl"],
        "best_w8a8": best_w8a8["name"], "qat_int4_ppl": qat_row["ppl"],
        "int8_kv_ppl": by["int8 KV cache (bf16 model)"]["ppl"],
        "float_finetune_control_ppl": ft_row["ppl"], "int4_ptq_of_finetune_ppl": ft_ptq_row["ppl"],
        "hard_int4_with_lm_head": {
            "ptq_ppl": by[f"{hard.label} (lm_head int4 too)"]["ppl"], "qat_ppl": qat_rows[" +lm_head"]["ppl"],
            "ptq_of_finetune_ppl": ft_ptq_rows[" +lm_head"]["ppl"],
            "qat_gap_recovered_vs_finetuned_control": _recovered(ft_ptq_rows[" +lm_head"]["ppl"],
                                                                 qat_rows[" +lm_head"]["ppl"], ft_row["ppl"])},
        "int8_wo_vs_bf16": by["int8"]["ppl"] / b - 1, "best_w8a8_vs_bf16": best_w8a8["ppl"] / b - 1,
        "qat_gap_recovered_vs_ptq_bf16": recovered, "qat_gap_recovered_vs_finetuned_control": recovered_vs_ft,
        "floors": {"int8_wo_within_1pct": by["int8"]["ppl"] / b - 1 <= 0.01,
                   "best_w8a8_within_3pct": best_w8a8["ppl"] / b - 1 <= 0.03,
                   "qat_recovers_half_gap": recovered >= 0.5,
                   "qat_recovers_half_gap_vs_control": recovered_vs_ft >= 0.5},
        "eval_tokens": rows[0]["tokens"], "qat_steps": args.qat_steps, "qat_tokens": args.qat_steps * tc.tokens_per_step,
        "wall_s": time.perf_counter() - t_start,
    }
    doc = {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"python": platform.python_version(), "jax": jax.__version__},
           "setup": {"eval": f"held-out modules {list(HELD_OUT)}, first {rows[0]['tokens']} target tokens, "
                             f"windows of {SEQ}", "calibration": f"{args.calib_samples} x {SEQ} training tokens",
                     "qat": {"steps": args.qat_steps, "batch": args.qat_batch, "lr": args.qat_lr,
                             "config": qcfg.label},
                     "kv": "dense path: quantize_kv / dequantize_kv of k and v (int8 per token per head)",
                     "quick": args.quick},
           "rows": rows, "summary": summary}
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    name = "quant_quality_quick" if args.quick else "quant_quality"
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=float))
    write_markdown(out / f"{name}.md", doc)
    print(json.dumps(summary, indent=2, default=float))


def _recovered(ptq: float, qat: float, ref: float) -> float:
    """Fraction of PTQ's perplexity gap to ``ref`` that QAT closes (1 = all of it, < 0 = worse than PTQ)."""
    return (ptq - qat) / (ptq - ref) if ptq > ref else float("nan")


def write_markdown(path: Path, doc: dict) -> None:
    s = doc["summary"]
    b = s["bf16_ppl"]
    lines = ["# Quantization quality: embedded tiny model, held-out perplexity", "",
             f"`experiments/quant_quality.py` on {doc['device']}, {doc['date']}. {doc['setup']['eval']}; "
             f"lower is better. Quantized rows compute in bfloat16 (CPU reference path of `quantized_matmul`); "
             f"int4 keeps the MLP down projections (K = 688) and the LM head in bfloat16; every other row keeps "
             f"only the LM head float.", "",
             "| variant | perplexity | vs bf16 | linear weights (MB) | notes |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        notes = []
        if "mean_weight_rel_error" in r:
            notes.append(f"mean rel. weight error {r['mean_weight_rel_error']:.4f}")
        if "train_s" in r:
            notes.append(f"{doc['setup']['qat']['steps']} steps, {r['train_s']:.0f} s")
        lines.append(f"| {r['name']} | {r['ppl']:.3f} | {100 * (r['ppl'] / b - 1):+.2f}% | "
                     f"{r['linear_bytes'] / 1e6:.2f} | {'; '.join(notes)} |")
    f = s["floors"]
    lines += ["", "## Floors", "",
              f"- int8 weight-only within 1% of bf16: {100 * s['int8_wo_vs_bf16']:+.2f}% -> "
              f"{'met' if f['int8_wo_within_1pct'] else 'NOT met'}",
              f"- best W8A8 ({s['best_w8a8']}) within 3%: {100 * s['best_w8a8_vs_bf16']:+.2f}% -> "
              f"{'met' if f['best_w8a8_within_3pct'] else 'NOT met'}",
              f"- QAT int4 recovers >= half of PTQ int4's gap to bf16: {100 * s['qat_gap_recovered_vs_ptq_bf16']:.0f}% "
              f"-> {'met' if f['qat_recovers_half_gap'] else 'NOT met'}",
              f"- the same against the control (a float fine-tune with the same data and steps, then PTQ int4 vs "
              f"that fine-tune in bf16): {100 * s['qat_gap_recovered_vs_finetuned_control']:.0f}% -> "
              f"{'met' if f['qat_recovers_half_gap_vs_control'] else 'NOT met'}",
              f"- harder case, the LM head in int4 too: PTQ {s['hard_int4_with_lm_head']['ptq_of_finetune_ppl']:.3f} "
              f"vs QAT {s['hard_int4_with_lm_head']['qat_ppl']:.3f} vs the fine-tuned control {s['float_finetune_control_ppl']:.3f}: "
              f"{100 * s['hard_int4_with_lm_head']['qat_gap_recovered_vs_finetuned_control']:.0f}% of the gap recovered", "",
              "The tiny model is under-trained, so any fine-tune lowers its held-out perplexity; the control rows "
              "separate what QAT recovers from what the extra training gives. int8 KV is measured in the dense "
              "path (k/v quantized and dequantized with the engine's int8 page format), not through the paged "
              "kernel.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
