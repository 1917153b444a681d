"""Sharded checkpoints in this project's Orbax layout (``autoglm_jax/checkpoint/orbax_io.py``).

* ``save_sharded(model, dir)``: writes the canonical layout (HF column order, original K; a tensor-parallel
  model is turned back on device first), one Orbax group per layer, straight from the device shards --
  no full host copy (``save_pretrained`` instead gathers each group to the host).
* ``restore_sharded(dir, mesh)``: ``load_orbax`` with a ``sharding_fn`` (Orbax ``ArrayRestoreArgs`` with the
  target sharding: each device reads only its own slices), then the tensor-parallel relayout on device.
  The mesh need not be the one the checkpoint was saved from.
* ``load_hf_sharded(hf_dir, mesh)``: a Hugging Face checkpoint straight into the sharded layout (``load_hf``
  reads one tensor at a time on the host and ``device_put``\\ s it with its sharding, then the relayout).

Multi-host: Orbax writes/reads each process's shards; the atomic rename in ``orbax_io.atomic_directory``
assumes a shared filesystem and was only exercised single-host here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from .partition import canonical_state, shard_model, sharding_fn_for


def save_sharded(model, out_dir: str | os.PathLike, *, overwrite: bool = False, extra_meta: dict | None = None) -> Path:
    from autoglm_jax.checkpoint import orbax_io

    tree, cfg = canonical_state(model)
    with orbax_io.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        params = tmp / "params"
        params.mkdir()
        groups = orbax_io.split_groups(tree)
        ckptr = ocp.PyTreeCheckpointer()
        for name, sub in groups.items():
            ckptr.save(params / name, sub)  # sharded jax.Arrays: each shard written from its device
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        orbax_io.write_marker(tmp, dtype=str(np.dtype(model.param_dtype)), groups=list(groups), extra=extra_meta)
    return Path(out_dir)


def restore_sharded(ckpt_dir: str | os.PathLike, mesh: Mesh, *, dtype=None, remat: str = "none",
                    progress: bool = False):
    """A model from ``ckpt_dir`` (written by ``save_sharded``, ``save_pretrained`` or ``autoglm convert``),
    sharded over ``mesh``. Each device reads only its own slices of every tensor."""
    from autoglm_jax.checkpoint import orbax_io
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.loading import load_orbax

    cfg = GLMConfig.from_json_file(Path(ckpt_dir) / "config.json")
    quant = orbax_io.read_marker(ckpt_dir).get("quantization")
    model = load_orbax(ckpt_dir, dtype=dtype, remat=remat, sharding_fn=sharding_fn_for(cfg, mesh, quantization=quant),
                       progress=progress)
    return shard_model(model, mesh)


def load_hf_sharded(hf_dir: str | os.PathLike, mesh: Mesh, *, dtype=None, remat: str = "none",
                    progress: bool = False):
    """A Hugging Face directory loaded straight into ``mesh``'s sharded (tensor-parallel) layout."""
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.loading import load_hf

    cfg = GLMConfig.from_json_file(Path(hf_dir) / "config.json")
    model = load_hf(hf_dir, dtype=dtype, remat=remat, sharding_fn=sharding_fn_for(cfg, mesh), progress=progress)
    return shard_model(model, mesh)


def from_pretrained_sharded(path_or_preset: str | os.PathLike, mesh: Mesh, *, dtype=None, remat: str = "none",
                            seed: int = 0, progress: bool = False):
    """``autoglm_jax.from_pretrained`` onto ``mesh``: what ``autoglm generate --tensor-parallel N`` calls with
    ``make_mesh(tensor=N)``. Checkpoint directories (Orbax or HF) are read straight into their shards;
    presets get seeded random weights built on one device, then sharded."""
    from autoglm_jax.checkpoint import orbax_io
    from autoglm_jax.loading import EMBEDDED_DIR, from_pretrained

    path = Path(path_or_preset)
    if path.is_dir() and orbax_io.is_orbax_checkpoint(path):
        return restore_sharded(path, mesh, dtype=dtype, remat=remat, progress=progress)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_sharded(path, mesh, dtype=dtype, remat=remat, progress=progress)
    if str(path_or_preset) == "tiny" and orbax_io.is_orbax_checkpoint(EMBEDDED_DIR):
        return restore_sharded(EMBEDDED_DIR, mesh, dtype=dtype, remat=remat)
    return shard_model(from_pretrained(path_or_preset, dtype=dtype, remat=remat, seed=seed, progress=progress), mesh)
