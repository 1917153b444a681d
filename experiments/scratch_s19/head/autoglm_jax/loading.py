"""``from_pretrained``: a Hugging Face directory, an Orbax directory written here, or a preset name.

Checkpoints are checked against the config before any device work (one error lists every missing,
unexpected and mis-shaped tensor), then read one tensor (HF) or one group (Orbax) at a time, each put on
its device straight away: host memory stays at about one layer.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from .checkpoint import orbax_io
from .checkpoint.hf_layout import check_hf_tensors, hf_rules
from .checkpoint.safetensors_io import CheckpointError, SafetensorsReader
from .config import PRESETS, GLMConfig
from .model import GLMForCausalLM, resolve_dtype

# A function from (param path tuple, abstract array) to the sharding it should be placed with.
ShardingFn = Callable[[tuple, jax.ShapeDtypeStruct], jax.sharding.Sharding]

EMBEDDED_DIR = Path(__file__).parent / "assets" / "tiny"


def _hf_dtype(directory: Path, hf: dict, reader: SafetensorsReader) -> str:
    name = hf.get("torch_dtype") or hf.get("dtype")
    if name in ("float32", "bfloat16", "float16"):
        return name
    return str(reader.infos["model.embed_tokens.weight"].dtype)


def abstract_model(cfg: GLMConfig, *, dtype, remat: str = "none", quantization: dict | None = None):
    """The model's structure with ShapeDtypeStruct leaves: (graphdef, abstract pure-dict state); quantization: a
    checkpoint's recorded ``quantization`` dict (``stored_quantization``)."""
    def build():
        model = GLMForCausalLM(cfg, dtype=dtype, param_dtype=dtype, remat=remat, rngs=nnx.Rngs(0))
        if quantization:
            from .model.quantized_linear import quantize_model  # quantized checkpoints (see autoglm quantize)
            quantize_model(model, **stored_quantization(quantization))  # in place
        return model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, state


def stored_quantization(quant: dict | None) -> dict | None:
    """A checkpoint's recorded ``quantization`` dict as ``quantize_model`` arguments that rebuild its layout: int4
    checkpoints written before session 14 recorded ``k_major="auto"`` when "auto" meant K-major only where O >= 2 I
    (``"wide"``; int4 "auto" now means every weight and is recorded as True)."""
    if quant and quant.get("fmt") == "int4" and quant.get("k_major") == "auto":
        return {**quant, "k_major": "wide"}
    return quant


def _place(path: tuple, array: np.ndarray, abstract, sharding_fn: ShardingFn | None):
    if sharding_fn is None:
        return jax.device_put(array)
    return jax.device_put(array, sharding_fn(path, abstract))


def _pure(state) -> dict:
    return nnx.to_pure_dict(state)


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def load_hf(directory: str | os.PathLike, *, dtype=None, remat: str = "none",
            sharding_fn: ShardingFn | None = None, progress: bool = True) -> GLMForCausalLM:
    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    cfg = GLMConfig.from_hf_dict(hf)
    reader = SafetensorsReader(directory)
    check_hf_tensors(cfg, {n: reader.shape(n) for n in reader.names()})
    dtype = resolve_dtype(dtype or _hf_dtype(directory, hf, reader))
    graphdef, state = abstract_model(cfg, dtype=dtype, remat=remat)
    tree = _pure(state)
    for rule in tqdm(hf_rules(cfg), desc=f"loading {directory.name}", disable=not progress, unit="tensor"):
        array = rule.to_ours([reader.read(n) for n in rule.sources]).astype(dtype, copy=False)
        _set(tree, rule.path, _place(rule.path, array, _get(tree, rule.path), sharding_fn))
    nnx.replace_by_pure_dict(state, tree)
    return nnx.merge(graphdef, state)


def load_orbax(directory: str | os.PathLike, *, dtype=None, remat: str = "none",
               sharding_fn: ShardingFn | None = None, progress: bool = True) -> GLMForCausalLM:
    directory = Path(directory)
    meta = orbax_io.read_marker(directory)
    cfg = GLMConfig.from_json_file(directory / "config.json")
    stored = resolve_dtype(meta["dtype"])
    quant = meta.get("quantization")
    if quant and dtype is not None and resolve_dtype(dtype) != stored:
        raise ValueError(f"{directory} is quantized with {meta['dtype']} float parts; load it with dtype=None "
                         f"or {meta['dtype']!r}")
    dtype = resolve_dtype(dtype or stored)
    graphdef, state = abstract_model(cfg, dtype=dtype, remat=remat, quantization=quant)
    groups = orbax_io.split_groups(_pure(state))
    orbax_io.check_groups(directory, groups)
    loaded = {}
    for name in tqdm(list(groups), desc=f"loading {directory.name}", disable=not progress, unit="group"):
        shard = None
        if sharding_fn is not None:
            prefix = (("layers", int(name.split(".")[1])) if name.startswith("layers.") else ())
            shard = jax.tree_util.tree_map_with_path(
                lambda p, a: sharding_fn(prefix + tuple(k.key for k in p), a), groups[name])
        loaded[name] = orbax_io.restore_group(directory, name, groups[name], shard)
    nnx.replace_by_pure_dict(state, orbax_io.join_groups(loaded))
    return nnx.merge(graphdef, state)


def random_model(cfg: GLMConfig, *, dtype="float32", seed: int = 0, remat: str = "none") -> GLMForCausalLM:
    return GLMForCausalLM(cfg, dtype=dtype, param_dtype=dtype, remat=remat, rngs=nnx.Rngs(seed))


def from_pretrained(path_or_preset: str | os.PathLike, *, dtype=None, remat: str = "none",
                    sharding_fn: ShardingFn | None = None, seed: int = 0, progress: bool = True) -> GLMForCausalLM:
    """Loads a model ready to call: ``model(input_ids [B, T]) -> logits [B, T, V]``.

    ``path_or_preset``: a Hugging Face directory (config.json + ``*.safetensors``, with or without the
    index), a directory written by ``autoglm convert`` / ``autoglm quantize``, or a preset name
    (``tiny`` is the embedded trained model when present; other presets get seeded random weights).
    """
    path = Path(path_or_preset)
    if path.is_dir():
        if orbax_io.is_orbax_checkpoint(path):
            return load_orbax(path, dtype=dtype, remat=remat, sharding_fn=sharding_fn, progress=progress)
        if (path / "config.json").exists():
            return load_hf(path, dtype=dtype, remat=remat, sharding_fn=sharding_fn, progress=progress)
        raise CheckpointError(f"{path} holds neither {orbax_io.MARKER} (this project's format) nor config.json "
                              "(a Hugging Face checkpoint)")
    name = str(path_or_preset)
    if name == "tiny" and orbax_io.is_orbax_checkpoint(EMBEDDED_DIR):
        return load_orbax(EMBEDDED_DIR, dtype=dtype, remat=remat, sharding_fn=sharding_fn, progress=False)
    if name in PRESETS:
        warnings.warn(f"preset {name!r}: seeded random weights (seed={seed}), not a trained model", stacklevel=2)
        return random_model(PRESETS[name], dtype=dtype or "float32", seed=seed, remat=remat)
    raise FileNotFoundError(f"{name!r} is neither a checkpoint directory nor a preset; presets: {sorted(PRESETS)}")


def load_model_and_tokenizer(name: str | os.PathLike, *, dtype=None, tensor_parallel: int = 1,
                             note: Callable[[str], None] = print):
    """What the commands load: (model, tokenizer) for a checkpoint directory or preset, sharded over
    ``tensor_parallel`` devices when > 1; ``note`` receives the random-weights notice of a preset."""
    from .tokenizer import load_tokenizer

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if tensor_parallel > 1:
            from sharding import from_pretrained_sharded, make_mesh

            model = from_pretrained_sharded(name, make_mesh(tensor=tensor_parallel), dtype=dtype)
        else:
            model = from_pretrained(name, dtype=dtype)
    for w in caught:
        if "random weights" in str(w.message):
            note(f"note: {w.message}")
    return model, load_tokenizer(checkpoint_dir(name))


def checkpoint_dir(name: str | os.PathLike) -> Path | None:
    """The directory holding ``name``'s files (tokenizer, chat template): itself, the embedded model's for
    ``tiny``, or None for a preset with random weights."""
    if Path(name).is_dir():
        return Path(name)
    return EMBEDDED_DIR if str(name) == "tiny" and EMBEDDED_DIR.is_dir() else None
