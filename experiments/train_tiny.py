"""Trains the embedded default model: a byte-level BPE tokenizer and a tiny GLM on the Python standard library.

    python experiments/train_tiny.py --minutes 25          # writes autoglm_jax/assets/tiny + results

Corpus: every ``.py`` file under the directory of ``os.__file__`` (tests, site-packages and generated files
excluded), sorted by path; the modules in ``HELD_OUT`` are the validation set (never seen by the tokenizer or
the model). Deterministic from ``--seed`` for a fixed ``--steps``; ``--minutes`` is a safety cap (the result
records whether it cut the run short). Writes:

* ``autoglm_jax/assets/tiny/`` via ``save_pretrained`` (bfloat16 weights, ``tokenizer.json``,
  ``tokenizer_config.json``), loaded by ``from_pretrained("tiny")``;
* ``experiments/results/train_tiny.json`` / ``.md`` (held-out perplexity, a sample; ``.png`` when matplotlib
  is installed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.bench_common import pyplot_or_none  # noqa: E402
from autoglm_jax.checkpoint.convert import save_pretrained  # noqa: E402
from autoglm_jax.config import GLMConfig  # noqa: E402
from autoglm_jax.generate import GenerationConfig, generate  # noqa: E402
from autoglm_jax.loading import EMBEDDED_DIR, from_pretrained  # noqa: E402
from autoglm_jax.train import (ScannedGLM, TokenBatches, TrainConfig, eval_batches, evaluate,  # noqa: E402
                               pack_documents, params_from_model, train)

HELD_OUT = ("argparse.py", "csv.py", "heapq.py", "textwrap.py", "uuid.py", "json")  # top-level stdlib names
EXCLUDE_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3/tests"}
EOS = "<|endoftext|>"  # id 0: the tiny preset's eos_token_ids=(0,) and pad_token_id=0
RESULTS = REPO / "experiments" / "results"


def stdlib_files() -> tuple[list[Path], list[Path]]:
    root = Path(os.__file__).parent
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDE_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        (held if rel.parts[0] in HELD_OUT else train).append(path)
    return train, held


def read(paths) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOS) == 0, tok.token_to_id(EOS)
    return tok


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts)]


def write_tokenizer_files(tok, directory: Path, max_len: int) -> None:
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS, "bos_token": None,
        "unk_token": None, "model_max_length": max_len, "clean_up_tokenization_spaces": False}, indent=2))
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 0, "pad_token_id": 0, "max_new_tokens": 64}, indent=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=448)
    ap.add_argument("--minutes", type=float, default=28.0, help="safety cap on training wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens scored (from the start)")
    ap.add_argument("--out", default=str(EMBEDDED_DIR))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "autoglm_train_tiny"))
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    train_paths, held_paths = stdlib_files()
    train_texts, held_texts = read(train_paths), read(held_paths)
    print(f"corpus: {len(train_paths)} train files ({sum(map(len, train_texts)) / 1e6:.1f} M chars), "
          f"{len(held_paths)} held-out files ({sum(map(len, held_texts)) / 1e6:.2f} M chars)", flush=True)
    tok = train_tokenizer(train_texts, args.vocab)
    t_tok = time.perf_counter() - t0
    train_stream = pack_documents(encode(tok, train_texts), eos_id=0)
    held_stream = pack_documents(encode(tok, held_texts), eos_id=0)
    held_chars = sum(map(len, held_texts)) + len(held_texts)
    print(f"tokenizer: vocab {tok.get_vocab_size()} in {t_tok:.0f} s; {len(train_stream)} train tokens, "
          f"{len(held_stream)} held-out tokens", flush=True)

    model_cfg = GLMConfig.from_preset("tiny", vocab_size=tok.get_vocab_size(), max_position_embeddings=2048,
                                      eos_token_ids=(0,), pad_token_id=0)
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch, total_steps=args.steps,
                      warmup_steps=max(1, args.steps // 20), learning_rate=args.lr, min_lr_ratio=0.1,
                      weight_decay=0.1, grad_clip_norm=1.0, seed=args.seed, log_every=8,
                      checkpoint_every=64, keep_checkpoints=1)
    data = TokenBatches(train_stream, seq_len=cfg.seq_len, batch_size=cfg.batch_size, seed=args.seed)
    metrics_path = work / "metrics.jsonl"
    result = train(model_cfg, cfg, data, checkpoint_dir=work / "ckpt", metrics_path=metrics_path,
                   time_budget_s=args.minutes * 60, progress=True)
    t_train = time.perf_counter() - t0 - t_tok
    steps_done = int(result.state.step)
    print(f"trained {steps_done} steps (stopped early: {result.stopped_early})", flush=True)

    # Ship it: bfloat16 weights (half the bytes), tokenizer beside them.
    side = work / "side"
    side.mkdir(exist_ok=True)
    write_tokenizer_files(tok, side, model_cfg.max_position_embeddings)
    out = Path(args.out)
    save_pretrained(result.model(dtype="bfloat16"), out, side_files_from=side, overwrite=True,
                    extra_meta={"trained_by": "experiments/train_tiny.py", "steps": steps_done, "seed": args.seed})
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)", flush=True)

    # Held-out perplexity of the shipped (bfloat16) weights, computed in float32.
    shipped = from_pretrained(out, progress=False)
    fwd = ScannedGLM.create(model_cfg)
    params = params_from_model(shipped)
    held = held_stream[: args.eval_tokens + 1]
    ev = evaluate(fwd, params, eval_batches(held, seq_len=cfg.seq_len, batch_size=cfg.batch_size))
    chars_per_token = held_chars / len(held_stream)
    bpb = ev["nll"] / np.log(2) / chars_per_token  # bits per character (stdlib source is ASCII almost entirely)
    ev_train = evaluate(fwd, params, eval_batches(train_stream[: 32768 + 1], seq_len=cfg.seq_len,
                                                  batch_size=cfg.batch_size))
    print(f"held-out perplexity {ev['perplexity']:.3f} over {ev['tokens']} tokens; train-sample {ev_train['perplexity']:.3f}",
          flush=True)

    prompt = "def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n"
    ids = tok.encode(prompt).ids
    greedy = generate(shipped, [ids], GenerationConfig(max_new_tokens=96))[0]
    sampled = generate(shipped, [ids], GenerationConfig(max_new_tokens=96, temperature=0.8, top_p=0.95, seed=1))[0]
    sample_greedy, sample_t08 = tok.decode(greedy), tok.decode(sampled)

    history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    n_params = model_cfg.num_params()
    summary = {
        "heldout_perplexity": ev["perplexity"], "heldout_nll": ev["nll"], "heldout_tokens_scored": ev["tokens"],
        "heldout_bits_per_char": bpb, "heldout_chars_per_token": chars_per_token,
        "train_sample_perplexity": ev_train["perplexity"], "steps": steps_done, "planned_steps": args.steps,
        "stopped_early_by_time_cap": result.stopped_early, "resumed_from": result.resumed_from,
        "tokens_seen": steps_done * cfg.tokens_per_step, "train_tokens_available": int(len(train_stream)),
        "epochs": steps_done * cfg.batch_size / data.num_windows, "params": n_params,
        "asset_bytes": size, "tokenizer_seconds": t_tok, "train_seconds": t_train,
        "final_train_loss": history[-1]["loss"] if history else None,
        "held_out_modules": list(HELD_OUT), "prompt": prompt, "sample_greedy": sample_greedy,
        "sample_temperature_0.8": sample_t08,
    }
    doc = {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"python": platform.python_version(), "jax": jax.__version__,
                        "tokenizers": __import__("tokenizers").__version__},
           "model_config": model_cfg.to_hf_dict(), "train_config": dataclasses.asdict(cfg),
           "rows": history, "summary": summary}
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "train_tiny.json").write_text(json.dumps(doc, indent=2))
    write_markdown(res / "train_tiny.md", doc)
    plot(res / "train_tiny.png", history)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("sample")}, indent=2))
    print("--- greedy sample ---\n" + prompt + sample_greedy)


def write_markdown(path: Path, doc: dict) -> None:
    s, c = doc["summary"], doc["train_config"]
    lines = [
        "# Embedded tiny model (`from_pretrained(\"tiny\")`)", "",
        f"Trained by `experiments/train_tiny.py` on {doc['device']}, {doc['date']}.", "",
        f"- Model: GLM 'tiny' preset, {s['params'] / 1e6:.2f} M parameters, shipped as bfloat16 "
        f"({s['asset_bytes'] / 1e6:.1f} MB in `autoglm_jax/assets/tiny/`).",
        f"- Tokenizer: byte-level BPE (`tokenizers`), vocab {doc['model_config']['vocab_size']}, "
        f"`<|endoftext|>` = id 0 = eos = pad.",
        f"- Data: Python standard library source (`os.__file__`'s directory, tests and site-packages excluded); "
        f"held out: {', '.join(s['held_out_modules'])}.",
        f"- Training: {s['steps']} steps (planned {s['planned_steps']}; time cap hit: {s['stopped_early_by_time_cap']}) "
        f"x {c['batch_size']} x {c['seq_len']} tokens = {s['tokens_seen'] / 1e6:.2f} M tokens "
        f"({s['epochs']:.2f} epochs of {s['train_tokens_available'] / 1e6:.2f} M), AdamW lr {c['learning_rate']} "
        f"warmup {c['warmup_steps']} + cosine, clip {c['grad_clip_norm']}, {s['train_seconds'] / 60:.1f} min.", "",
        "| metric | value |", "|---|---|",
        f"| held-out perplexity (per token, {s['heldout_tokens_scored']} tokens) | **{s['heldout_perplexity']:.3f}** |",
        f"| held-out bits per character | {s['heldout_bits_per_char']:.3f} |",
        f"| train-sample perplexity (32k tokens) | {s['train_sample_perplexity']:.3f} |",
        f"| final train loss | {s['final_train_loss']:.4f} |", "",
        "## Sample (greedy, 96 new tokens)", "", "```python", s["prompt"] + s["sample_greedy"], "```", "",
        "## Sample (temperature 0.8, top-p 0.95, seed 1)", "", "```python", s["prompt"] + s["sample_temperature_0.8"],
        "```", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, history: list[dict]) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title("tiny GLM on the Python stdlib")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
