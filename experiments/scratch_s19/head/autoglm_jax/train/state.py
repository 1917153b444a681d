"""Train state (step, params, optimizer state, data position, PRNG key), the optimizer, and exact-resume
checkpoints of the whole state.

A checkpoint is ``<dir>/step_<N>/``: ``state/`` an Orbax PyTree of the state's leaves keyed by their tree
path, and ``train_state.json`` (step, data position, leaf count, the configs). It is written into a temporary
sibling and renamed into place (``orbax_io.atomic_directory``), so an interrupted save leaves nothing that
restores. Restoring needs the abstract state (built from the same configs): the tree structure comes from
there, and every leaf's path, shape and dtype is checked before it is used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct

from ..checkpoint import orbax_io
from ..checkpoint.safetensors_io import CheckpointError
from .config import TrainConfig

STATE_FILE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: dict  # stacked float32 parameters (see scanned.stack_layers)
    opt_state: Any
    data_position: jax.Array  # int32 scalar: batches consumed from the training data
    rng: jax.Array  # uint32 raw PRNG key data (jax.random.key_data), split once per step


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``learning_rate * min_lr_ratio`` at ``total_steps``."""
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.warmup_steps == 0:
        return optax.cosine_decay_schedule(cfg.learning_rate, cfg.total_steps, alpha=cfg.min_lr_ratio)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                              max(cfg.total_steps, cfg.warmup_steps + 1), end_value=end)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with the warmup + cosine schedule; gradients clipped to ``grad_clip_norm`` (global norm) first."""
    def mask(params):
        # Stacked layer params carry a leading [L] axis: a layer matrix is 3-D there, a layer vector 2-D.
        out = {k: jax.tree.map(lambda x: x.ndim >= 2, v) for k, v in params.items() if k != "layers"}
        if "layers" in params:
            out["layers"] = jax.tree.map(lambda x: x.ndim >= 3, params["layers"])
        return out

    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=mask)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw


def init_train_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      data_position=jnp.zeros((), jnp.int32),
                      rng=jax.random.key_data(jax.random.key(seed)))


# ---- checkpoints ---------------------------------------------------------------------------------------------

def _keyed_leaves(state: TrainState) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {f"{i:05d}{_safe(jax.tree_util.keystr(p))}": leaf for i, (p, leaf) in enumerate(flat)}


def _safe(keystr: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", keystr)


def save_train_state(state: TrainState, directory: str | os.PathLike, *, extra: dict | None = None,
                     keep: int | None = None) -> Path:
    """Writes ``directory/step_<N>`` atomically; keeps the newest ``keep`` step directories when given."""
    step = int(state.step)
    out = Path(directory) / f"step_{step:08d}"
    leaves = {k: np.asarray(v) for k, v in _keyed_leaves(state).items()}
    with orbax_io.atomic_directory(out, overwrite=True) as tmp:
        ocp.PyTreeCheckpointer().save(tmp / "state", leaves)
        meta = {"step": step, "data_position": int(state.data_position), "num_leaves": len(leaves),
                **(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete step directories under ``directory``, oldest first (partial writes are never listed)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def restore_train_state(path: str | os.PathLike, abstract: TrainState) -> TrainState:
    """Restores a state saved by ``save_train_state`` into the structure of ``abstract`` (from ``jax.eval_shape``
    of the same init), checking every leaf's name, shape and dtype first."""
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise CheckpointError(f"{path} is not a train-state checkpoint (no {STATE_FILE})")
    want = _keyed_leaves(abstract)
    ckptr = ocp.PyTreeCheckpointer()
    stored = ckptr.metadata(path / "state").item_metadata.tree
    problems = [f"missing {k}" for k in want if k not in stored]
    problems += [f"unexpected {k}" for k in stored if k not in want]
    for k in set(want) & set(stored):
        if tuple(stored[k].shape) != tuple(want[k].shape) or np.dtype(stored[k].dtype) != np.dtype(want[k].dtype):
            problems.append(f"{k}: stored {np.dtype(stored[k].dtype)}{list(stored[k].shape)}, expected "
                            f"{np.dtype(want[k].dtype)}{list(want[k].shape)}")
    if problems:
        raise CheckpointError(f"{path} does not match this training setup (model/optimizer config changed?):\n  "
                              + "\n  ".join(sorted(problems)[:40]))
    args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in want}
    restored = ckptr.restore(path / "state", restore_args=args)
    leaves = [jnp.asarray(restored[k], dtype=want[k].dtype) for k in want]
    return jax.tree.unflatten(jax.tree.structure(abstract), leaves)
