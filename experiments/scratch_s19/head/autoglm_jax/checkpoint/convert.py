"""Conversion between Hugging Face safetensors and this project's Orbax layout, streamed and atomic.

HF -> Orbax reads one tensor at a time and writes one group (about one layer) at a time; Orbax -> HF
restores one group at a time and streams tensors into safetensors files. Same dtype both ways is bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import jax
from flax.traverse_util import unflatten_dict
from tqdm.auto import tqdm

from ..config import GLMConfig
from ..model import resolve_dtype
from . import orbax_io
from .hf_layout import check_hf_tensors, hf_rules
from .safetensors_io import CheckpointError, SafetensorsReader, TensorSpec, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def convert_hf_to_orbax(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None,
                        overwrite: bool = False, progress: bool = True) -> Path:
    """Writes ``out_dir`` (see ``orbax_io``) from a Hugging Face directory; nothing appears there on failure."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").exists():
        raise CheckpointError(f"{hf_dir} has no config.json")
    hf = json.loads((hf_dir / "config.json").read_text())
    cfg = GLMConfig.from_hf_dict(hf)
    reader = SafetensorsReader(hf_dir)
    check_hf_tensors(cfg, {n: reader.shape(n) for n in reader.names()})
    target = np.dtype(resolve_dtype(dtype)) if dtype else reader.infos["model.embed_tokens.weight"].dtype
    rules = hf_rules(cfg)
    with orbax_io.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        params = tmp / "params"
        params.mkdir()
        groups: list[str] = []
        bar = tqdm(total=len(rules), desc=f"converting {hf_dir.name}", disable=not progress, unit="tensor")
        current, tree = None, {}
        for rule in rules + [None]:
            group = rule.group if rule else None
            if group != current and current is not None:
                orbax_io.write_group(params, current, orbax_io.split_groups(unflatten_dict(tree))[current])
                groups.append(current)
                tree = {}
            if rule is None:
                break
            current = group
            tree[rule.path] = rule.to_ours([reader.read(n) for n in rule.sources]).astype(target, copy=False)
            bar.update(1)
        bar.close()
        out_cfg = dict(hf)
        out_cfg["torch_dtype"] = str(np.dtype(target))
        (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2))
        _copy_side_files(hf_dir, tmp)
        orbax_io.write_marker(tmp, dtype=str(np.dtype(target)), groups=groups, extra={"source": str(hf_dir)})
    return Path(out_dir)


def export_orbax_to_hf(orbax_dir: str | os.PathLike, hf_dir: str | os.PathLike, *, overwrite: bool = False,
                       max_shard_bytes: int = 4 << 30, progress: bool = True) -> Path:
    """Writes Hugging Face safetensors (+ config and tokenizer files) from an unquantized Orbax directory."""
    orbax_dir = Path(orbax_dir)
    meta = orbax_io.read_marker(orbax_dir)
    if meta.get("quantization"):
        raise CheckpointError(f"{orbax_dir} is quantized ({meta['quantization']}); export takes float checkpoints")
    cfg = GLMConfig.from_json_file(orbax_dir / "config.json")
    rules = hf_rules(cfg)
    dtype = np.dtype(resolve_dtype(meta["dtype"]))
    specs, owner = [], {}
    for r in rules:
        for i, (name, shape) in enumerate(zip(r.sources, r.hf_shapes)):
            specs.append(TensorSpec(name, shape, dtype))
            owner[name] = (r, i)
    ckptr = ocp.PyTreeCheckpointer()
    cache: dict = {"group": None, "tree": None, "parts": {}}

    def produce(name: str) -> np.ndarray:
        rule, i = owner[name]
        if cache["group"] != rule.group:
            gdir = orbax_dir / "params" / rule.group
            meta_tree = ckptr.metadata(gdir).item_metadata.tree
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta_tree,
                                is_leaf=lambda x: hasattr(x, "shape"))
            cache.update(group=rule.group, tree=ckptr.restore(gdir, restore_args=args), parts={})
        if rule.path not in cache["parts"]:
            sub = cache["tree"]
            for k in (rule.path[2:] if rule.path[0] == "layers" else rule.path):
                sub = sub[k]
            cache["parts"] = {rule.path: rule.to_hf(np.asarray(sub))}
        return cache["parts"][rule.path][i]

    with orbax_io.atomic_directory(hf_dir, overwrite=overwrite) as tmp:
        bar = lambda it: tqdm(it, desc=f"exporting {orbax_dir.name}", disable=not progress, unit="tensor")
        write_safetensors(tmp, specs, produce, max_shard_bytes=max_shard_bytes, progress=bar)
        shutil.copy2(orbax_dir / "config.json", tmp / "config.json")
        _copy_side_files(orbax_dir, tmp)
    return Path(hf_dir)


def save_pretrained(model, out_dir: str | os.PathLike, *, side_files_from: str | os.PathLike | None = None,
                    quantization: dict | None = None, overwrite: bool = False, extra_meta: dict | None = None) -> Path:
    """Writes a model held in memory (trained, quantized or random) in this project's Orbax layout.

    ``side_files_from``: a directory whose tokenizer/generation files are copied alongside.
    """
    from flax import nnx

    tree = nnx.to_pure_dict(nnx.state(model))
    with orbax_io.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        params = tmp / "params"
        params.mkdir()
        groups = orbax_io.split_groups(tree)
        for name, sub in groups.items():
            orbax_io.write_group(params, name, sub)
        (tmp / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2))
        if side_files_from is not None:
            _copy_side_files(Path(side_files_from), tmp)
        orbax_io.write_marker(tmp, dtype=str(np.dtype(model.param_dtype)), groups=list(groups),
                              quantization=quantization, extra=extra_meta)
    return Path(out_dir)
