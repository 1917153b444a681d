"""This project's checkpoint directory: Orbax groups written atomically, restored group by group.

Layout::

    OUT/autoglm.json       format marker, parameter dtype, quantization, group names (quantization: the
                           ``quantize_model`` keyword arguments; ``k_major: true`` = int8 / int4 stored
                           [N, K] (int4: packed [N, K/2]), ``k_major: "auto"`` = per weight (int8: [N, K]
                           unless K > N; int4, written before session 14: [N, K/2] where N >= 2 K; int4
                           "auto" is recorded as true since); absent = [K, N], as every checkpoint written
                           before the option)
    OUT/config.json        Hugging Face config (new layout)
    OUT/tokenizer*.json    copied from the source checkpoint when present
    OUT/params/<group>/    one Orbax PyTree checkpoint per group: "embed", "layers.<i>", "head"

Writing one group at a time bounds host memory to about one layer; ``atomic_directory`` writes into a
temporary sibling and renames it into place, so an interrupted write leaves nothing that loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from .safetensors_io import CheckpointError

MARKER = "autoglm.json"
FORMAT = "autoglm-orbax"
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory next to ``out_dir``; renamed to ``out_dir`` only on success."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new directory or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def group_of(path: tuple) -> str:
    return f"layers.{path[1]}" if path[0] == "layers" else ("embed" if path[0] == "embed" else "head")


def split_groups(tree: dict) -> dict[str, dict]:
    """Splits a pure-dict model state into checkpoint groups (each a dict with string keys)."""
    groups: dict[str, dict] = {"embed": {}}
    for key, value in tree.items():
        if key == "layers":
            for i, layer in sorted(value.items()):
                groups[f"layers.{i}"] = layer
        elif key == "embed":
            groups["embed"]["embed"] = value
        else:
            groups.setdefault("head", {})[key] = value
    return groups


def join_groups(groups: dict[str, dict]) -> dict:
    tree: dict[str, Any] = {}
    for name, sub in groups.items():
        if name.startswith("layers."):
            tree.setdefault("layers", {})[int(name.split(".")[1])] = sub
        else:
            tree.update(sub)
    return tree


def write_group(params_dir: Path, name: str, tree: dict) -> None:
    tree = jax.tree.map(np.asarray, tree)
    ocp.PyTreeCheckpointer().save(params_dir / name, tree)


def write_marker(out: Path, *, dtype: str, groups: list[str], quantization: dict | None = None,
                 extra: dict | None = None) -> None:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dtype": dtype, "quantization": quantization,
            "groups": groups, **(extra or {})}
    (out / MARKER).write_text(json.dumps(meta, indent=2))


def read_marker(ckpt_dir: str | os.PathLike) -> dict:
    path = Path(ckpt_dir) / MARKER
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not "
                              f"{FORMAT!r} v{FORMAT_VERSION}")
    return meta


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).exists()


def check_groups(ckpt_dir: Path, abstract: dict[str, dict]) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor across all groups.

    Float tensors may be restored into another float dtype (restore casts); integer tensors must match.
    """
    problems = []
    ckptr = ocp.PyTreeCheckpointer()
    for name, sub in abstract.items():
        gdir = ckpt_dir / "params" / name
        if not gdir.exists():
            problems.append(f"missing group {name!r}")
            continue
        stored = flatten_dict(ckptr.metadata(gdir).item_metadata.tree)
        want = flatten_dict(sub)
        stored = {tuple(str(k) for k in p): m for p, m in stored.items()}
        want = {tuple(str(k) for k in p): a for p, a in want.items()}
        for p in sorted(set(want) - set(stored)):
            problems.append(f"{name}: missing tensor {'/'.join(p)}")
        for p in sorted(set(stored) - set(want)):
            problems.append(f"{name}: unexpected tensor {'/'.join(p)}")
        for p in sorted(set(want) & set(stored)):
            have_dt, want_dt = np.dtype(stored[p].dtype), np.dtype(want[p].dtype)
            castable = have_dt == want_dt or (jnp.issubdtype(have_dt, jnp.floating) and jnp.issubdtype(want_dt, jnp.floating))
            if tuple(stored[p].shape) != tuple(want[p].shape) or not castable:
                problems.append(f"{name}: {'/'.join(p)} is {np.dtype(stored[p].dtype)}{list(stored[p].shape)}, "
                                f"expected {np.dtype(want[p].dtype)}{list(want[p].shape)}")
    if problems:
        raise CheckpointError(f"{ckpt_dir} does not match the model:\n  " + "\n  ".join(problems[:40]))


def restore_group(ckpt_dir: Path, name: str, abstract: dict, shardings: dict | None = None) -> dict:
    """Restores one group straight into device arrays (each device reads only its own shards)."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda _: default, abstract)
    args = jax.tree.map(lambda a, s: ocp.ArrayRestoreArgs(sharding=s, global_shape=a.shape, dtype=a.dtype),
                        abstract, shardings)
    return ocp.PyTreeCheckpointer().restore(ckpt_dir / "params" / name, restore_args=args)
