"""The training loop: resume, jitted steps, a progress bar, JSONL metrics, periodic atomic checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from ..config import GLMConfig
from ..model.remat import resolve_remat
from .config import TrainConfig, TrainConfigError
from .data import TokenBatches
from .scanned import ScannedGLM
from .state import (TrainState, init_train_state, latest_checkpoint, learning_rate_schedule, make_optimizer,
                    restore_train_state, save_train_state)
from .step import make_eval_step, make_train_step


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    fwd: ScannedGLM
    history: list[dict]
    stopped_early: bool  # True when the time budget ended the run before total_steps
    resumed_from: str | None

    def model(self, dtype: str | None = None):
        """The trained parameters as a serving ``GLMForCausalLM`` (unrolled layers)."""
        return self.fwd.to_model(self.state.params, dtype=dtype)


def build(model_cfg: GLMConfig, cfg: TrainConfig, *, offload_fallback: bool = False):
    """(forward, optimizer, jitted step): validates the remat policy against this backend first.

    Cached on the fields that change the compiled step, so runs that differ only in logging, checkpointing,
    seed or length (e.g. a resume) reuse one compilation.
    """
    remat = resolve_remat(cfg.remat, fallback=offload_fallback)
    return _build(model_cfg, cfg.replace(remat=remat, log_every=1, checkpoint_every=0, keep_checkpoints=1, seed=0))


@functools.lru_cache(maxsize=16)
def _build(model_cfg: GLMConfig, cfg: TrainConfig):
    fwd = ScannedGLM.create(model_cfg, dtype=cfg.dtype, remat=cfg.remat)
    tx = make_optimizer(cfg)
    return fwd, tx, make_train_step(fwd, tx, cfg)


def abstract_train_state(fwd: ScannedGLM, tx, seed: int) -> TrainState:
    return jax.eval_shape(lambda p: init_train_state(p, tx, seed), fwd.abstract_params())


def train(model_cfg: GLMConfig, cfg: TrainConfig, data: TokenBatches, *, init_params: dict | None = None,
          checkpoint_dir: str | os.PathLike | None = None, metrics_path: str | os.PathLike | None = None,
          resume: bool = True, stop_at_step: int | None = None, time_budget_s: float | None = None,
          progress: bool = True, offload_fallback: bool = False, checkpoint_extra: dict | None = None
          ) -> TrainResult:
    """Trains until ``cfg.total_steps`` (or ``stop_at_step``, or the time budget), resuming from the newest
    checkpoint in ``checkpoint_dir`` when there is one and ``resume`` is set.

    ``init_params``: stacked float32 params to start from (default: a fresh init from ``cfg.seed``).
    Metrics (step, loss, lr, grad_norm, tokens/s) go to ``metrics_path`` as JSON lines every ``log_every`` steps.
    """
    if data.batch_size != cfg.batch_size or data.seq_len != cfg.seq_len:
        raise TrainConfigError(f"data gives batches of {data.batch_size} x {data.seq_len} tokens but the config "
                               f"asks for batch_size={cfg.batch_size}, seq_len={cfg.seq_len}")
    stop = min(cfg.total_steps, stop_at_step if stop_at_step is not None else cfg.total_steps)
    fwd, tx, step_fn = build(model_cfg, cfg, offload_fallback=offload_fallback)
    resumed_from = None
    ckpt = latest_checkpoint(checkpoint_dir) if (checkpoint_dir is not None and resume) else None
    if ckpt is not None:
        state = restore_train_state(ckpt, abstract_train_state(fwd, tx, cfg.seed))
        resumed_from = str(ckpt)
    else:
        params = init_params if init_params is not None else fwd.init_params(cfg.seed)
        state = init_train_state(params, tx, cfg.seed)
    step, position = int(state.step), int(state.data_position)
    schedule = learning_rate_schedule(cfg)
    extra = {"train_config": dataclasses.asdict(cfg), "model_config": model_cfg.to_hf_dict(),
             **(checkpoint_extra or {})}
    metrics_file = open(metrics_path, "a") if metrics_path is not None else None
    history: list[dict] = []
    bar = tqdm(total=stop, initial=step, desc="train", disable=not progress, unit="step")
    start = time.perf_counter()
    window_start, window_tokens = start, 0
    stopped_early = False
    try:
        while step < stop:
            tokens, mask = data.batch(position)
            state, metrics = step_fn(state, tokens, mask)
            step, position = step + 1, position + 1
            window_tokens += cfg.tokens_per_step
            if step % cfg.log_every == 0 or step == stop:
                loss = float(metrics["loss"])  # waits for the step
                now = time.perf_counter()
                row = {"step": step, "loss": loss, "lr": float(schedule(step - 1)),
                       "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": window_tokens / (now - window_start),
                       "epoch": data.epoch_of(position), "elapsed_s": now - start}
                window_start, window_tokens = now, 0
                history.append(row)
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if checkpoint_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save_train_state(state, checkpoint_dir, extra=extra, keep=cfg.keep_checkpoints)
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s and step < stop:
                stopped_early = True
                break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    if checkpoint_dir is not None and (latest_checkpoint(checkpoint_dir) is None
                                       or int(latest_checkpoint(checkpoint_dir).name.split("_")[1]) != step):
        save_train_state(state, checkpoint_dir, extra=extra, keep=cfg.keep_checkpoints)
    return TrainResult(state=state, fwd=fwd, history=history, stopped_early=stopped_early, resumed_from=resumed_from)


def evaluate(fwd: ScannedGLM, params: dict, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean masked next-token NLL (nats) and perplexity over ``batches`` (e.g. ``data.eval_batches``)."""
    eval_fn = make_eval_step(fwd)
    total, count = 0.0, 0.0
    for tokens, mask in batches:
        t, c = eval_fn(params, tokens, mask)
        total, count = total + float(t), count + float(c)
    nll = total / max(count, 1.0)
    return {"nll": nll, "perplexity": math.exp(nll), "tokens": int(count)}
