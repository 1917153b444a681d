"""Shardings for a model's state, ``shard_model``, and logical-name activation constraints.

No import of ``autoglm_jax`` at module level: the model imports ``constrain`` from here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import layout as tp
from .mesh import DATA, FSDP, TENSOR, MeshError, mesh_shape
from .rules import logical_to_spec

Path = tuple  # a parameter's path in the pure-dict model state, e.g. ("layers", 3, "attn", "qkv_proj", "kernel")


# ------------------------------------------------------------------------------------ activations
def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op unless a mesh is active (``jax.set_mesh``).

    Model code calls this with logical names only (e.g. ``("batch", "sequence", "heads", None)``).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(mesh.axis_names) & set(RULES_MESH_AXES):
        return x
    spec = logical_to_spec(names, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)


RULES_MESH_AXES = (DATA, FSDP, TENSOR)


def on_one_device() -> bool:
    """No multi-device mesh is in context (``use_mesh``): whole-array kernels may run as they are."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or math.prod(mesh.shape.values()) == 1


def use_mesh(mesh: Mesh | None):
    """Context manager that activates ``mesh`` for ``constrain`` (and jit's PartitionSpecs): ``jax.set_mesh``.
    ``None`` (a model on one device) activates nothing."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def mesh_of(tree) -> Mesh | None:
    """The mesh the first ``NamedSharding`` leaf of ``tree`` (e.g. a model's state) is sharded over, or None.

    Call jitted model code under ``use_mesh(mesh_of(state))``: without an active mesh the activation
    constraints are no-ops and XLA's sharding propagation alone lays out the residual stream."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


# ------------------------------------------------------------------------------------ parameters
def logical_axes(model) -> dict[Path, tuple]:
    """{param path: logical axes} from the ``logical_axes`` metadata of every ``nnx.Param``.

    Params without metadata map to ``None`` (replicated)."""
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out = {}
    for path, var in leaves:
        key = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
        axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
        out[key] = tuple(axes) if axes is not None else None
    return out


def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else np.shape(v)


def _named(mesh: Mesh, axes, shape) -> NamedSharding:
    if axes is None or len(axes) != len(shape):
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh_shape(mesh)))


def _pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def param_shardings(model, mesh: Mesh) -> dict:
    """Pure-dict tree (same structure as ``nnx.to_pure_dict(nnx.state(model))``) of ``NamedSharding``."""
    axes = logical_axes(model)
    flat = flatten_dict(_pure(model))
    return unflatten_dict({p: _named(mesh, axes.get(p), _shape(v)) for p, v in flat.items()})


def sharding_fn_for(cfg, mesh: Mesh, *, quantization: dict | None = None):
    """A ``loading.ShardingFn`` (path, abstract) -> NamedSharding for the canonical (HF-order) layout of
    ``cfg`` (quantized as ``quantization`` describes, e.g. an Orbax marker's): pass it to ``from_pretrained``
    so each tensor is placed straight onto its devices."""
    from autoglm_jax.loading import abstract_model

    graphdef, state = abstract_model(cfg, dtype="float32", quantization=quantization)
    axes = logical_axes(nnx.merge(graphdef, state))

    def fn(path: Path, a) -> NamedSharding:
        return _named(mesh, axes.get(tuple(path)), a.shape)
    return fn


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Inputs such as token ids [B, T]: batch over (data, fsdp) where it divides, the rest replicated."""
    names = ("batch",) + (None,) * (len(shape) - 1)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh_shape(mesh)))


def shardings_like(tree, param_shards: dict, mesh: Mesh):
    """Shardings for a tree holding copies of the params (optax state: mu, nu, ...): every leaf whose path
    ends with a param path and has that param's shape gets the param's sharding; others are replicated."""
    flat_params = flatten_dict(param_shards)
    by_suffix = {p: s for p, s in flat_params.items()}

    def pick(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path)
        for n in range(min(len(keys), 8), 0, -1):
            s = by_suffix.get(keys[-n:])
            if s is not None and len(s.spec) <= np.ndim(leaf):
                return s
        return replicated(mesh)
    return jax.tree_util.tree_map_with_path(pick, tree)


# ------------------------------------------------------------------------------------ model
def check_model_fits(cfg, mesh: Mesh) -> None:
    """Raises ``MeshError`` (before any device work) when the tensor degree does not divide the widths that
    tensor parallelism splits: query heads N, KV heads K (or K not dividing it), MLP width F, vocab V."""
    t = mesh_shape(mesh).get(TENSOR, 1)
    if t == 1:
        return
    problems = []
    for what, size in (("num_heads (N)", cfg.num_heads), ("intermediate_size (F)", cfg.intermediate_size),
                       ("vocab_size (V)", cfg.vocab_size)):
        if size % t:
            problems.append(f"{what}={size} is not a multiple of the tensor degree {t}")
    k = cfg.num_kv_heads
    if (k >= t and k % t) or (k < t and t % k):
        problems.append(f"num_kv_heads (K)={k} and tensor degree {t}: one must divide the other "
                        "(KV heads are split when K >= t, repeated t/K times when K < t)")
    if problems:
        ok = [d for d in range(1, max(cfg.num_heads, 2) + 1)
              if all(s % d == 0 for s in (cfg.num_heads, cfg.intermediate_size, cfg.vocab_size))
              and (k % d == 0 or d % k == 0)]
        raise MeshError("mesh does not fit the model: " + "; ".join(problems) + f". Tensor degrees that fit: {ok}")


def shard_model(model, mesh: Mesh):
    """Returns a copy of ``model`` with every parameter sharded over ``mesh`` (the input is left as is).

    With a tensor degree t > 1 the fused qkv / gate_up columns are permuted into the per-shard layout and
    KV heads repeated to a multiple of t (``layout.py``); the returned model's ``cfg.num_kv_heads`` is then
    K' = max(K, t) -- caches built from ``model.cfg`` (``DenseKVCache.create``) have K' heads, sharded one
    group per device. ``model.tp_layout`` records how to undo it (``checkpoint.save_sharded`` does).
    """
    if getattr(model, "tp_layout", None) is not None:
        raise ValueError("model is already in a tensor-parallel layout; shard the original model "
                         "(or save with sharding.save_sharded and restore onto the new mesh)")
    cfg = model.cfg
    check_model_fits(cfg, mesh)
    t = mesh_shape(mesh).get(TENSOR, 1)
    graphdef, state = nnx.split(model)
    axes = logical_axes(model)
    tree = nnx.to_pure_dict(state)
    canonical = {p: _named(mesh, axes.get(p), np.shape(v)) for p, v in flatten_dict(tree).items()}
    tree = jax.device_put(tree, unflatten_dict(canonical))  # each device gets only its slice
    if t > 1:
        plan = tp.plan(cfg, t)
        relayout = lambda x: tp.to_tp_layout(x, cfg, plan, axes)
        abstract = jax.eval_shape(relayout, tree)
        target = unflatten_dict({p: _named(mesh, axes.get(p), a.shape) for p, a in flatten_dict(abstract).items()})
        tree = jax.jit(relayout, out_shardings=target)(tree)
    nnx.replace_by_pure_dict(state, tree)
    new = nnx.merge(graphdef, state)
    if t > 1:
        set_tp_layout(new, plan, tp.tp_config(cfg, plan))
    return new


def set_tp_layout(model, plan, cfg) -> None:
    """Marks ``model`` (whose weights already are in ``plan``'s layout) as such: config and group counts."""
    model.cfg = cfg
    model.tp_layout = (plan.tensor, plan.kv_repeat, plan.num_kv_heads)
    for layer in model.layers:
        layer.attn.cfg = cfg
        layer.attn.qkv_groups = plan.tensor
        layer.mlp.gate_up_groups = plan.tensor
        # Row-parallel int8 layers: the split activation's step per device-local K block, so no cross-device max.
        for row_parallel in (layer.attn.o_proj, layer.mlp.down_proj):
            if hasattr(row_parallel, "qweight"):
                row_parallel.k_blocks = plan.tensor


def canonical_state(model) -> tuple[dict, object]:
    """(pure-dict state in the HF column order with the original K, canonical config), still on device."""
    tree = _pure(model)
    layout = getattr(model, "tp_layout", None)
    if layout is None:
        return tree, model.cfg
    t, r, k = layout
    cfg = model.cfg.replace(num_kv_heads=k)
    plan = tp.TPLayout(tensor=t, kv_repeat=r, num_kv_heads=k)
    mesh = _mesh_of(tree)
    axes = logical_axes(model)  # same names in both layouts
    undo = lambda x: tp.from_tp_layout(x, cfg, plan, axes)
    abstract = jax.eval_shape(undo, tree)
    target = unflatten_dict({p: _named(mesh, axes.get(p), a.shape) for p, a in flatten_dict(abstract).items()})
    return jax.jit(undo, out_shardings=target)(tree), cfg


def _mesh_of(tree) -> Mesh:
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    raise ValueError("model parameters are not sharded over a mesh")


# ------------------------------------------------------------------------------------ caches
DENSE_CACHE_AXES = ("batch", "kv_heads", "sequence", None)  # a dense KV cache layer [B, K, S, H]


def kv_cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Dense KV cache layer [B, K, S, H]: batch over (data, fsdp), KV heads over tensor (when they divide)."""
    return NamedSharding(mesh, logical_to_spec(DENSE_CACHE_AXES, shape, mesh_shape(mesh)))


def cache_shardings(cache, mesh: Mesh):
    """Shardings for a ``DenseKVCache`` (a tree of [B, K, S, H] arrays and a scalar row offset, replicated)
    -- for ``jax.device_put`` or jit."""
    return jax.tree.map(lambda a: kv_cache_sharding(mesh, a.shape) if a.ndim else NamedSharding(mesh, PartitionSpec()), cache)


def paged_cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Paged KV pages [K, P, L, H] (or int8 scales [K, P, L]): KV heads over tensor, pages replicated."""
    names = ("kv_heads", "pages", "page_slots", None)[:len(shape)]
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh_shape(mesh)))


def per_device_bytes(tree) -> dict:
    """{device: bytes of the shards it holds} over every array in ``tree``."""
    out: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
