"""The serving engine on a device mesh: tensor parallelism (``LLM(model, mesh=make_mesh(tensor=t))``).

What is sharded, over the mesh's ``tensor`` axis of t devices:

* the model, by ``sharding.shard_model`` (column-parallel qkv / gate_up / LM head, row-parallel o_proj /
  down_proj; KV heads repeated to K' = max(K, t)); a model already sharded on the same mesh is kept as is;
* the KV page pool: pages [K', P, L, H] and int8 scales [K', P, L] split on K' (``paged_cache_sharding``),
  so each device holds K'/t KV heads of every page;
* the paged attention kernels run per shard (``sharding.kernels``, shard_map): device g attends its N/t
  query heads to its K'/t KV heads, no communication.

Step inputs (token ids, positions, page tables, ...) are replicated; the scheduler is unchanged (page ids
mean the same page on every device).

Only tensor parallelism: the engine packs a step's tokens into one [1, T] row, so a ``data`` or ``fsdp`` axis
would only repeat the work (run one engine per data replica instead); such meshes raise ``MeshError``.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import MESH_AXES, TENSOR, MeshError, mesh_shape
from sharding.partition import check_model_fits, mesh_of, shard_model


def model_mesh(model) -> Mesh | None:
    """The mesh the model's parameters are sharded over (None for a model on one device)."""
    from flax import nnx

    return mesh_of(nnx.state(model, nnx.Param))


def tensor_degree(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh_shape(mesh).get(TENSOR, 1)


def check_engine_mesh(model, mesh: Mesh | None) -> Mesh | None:
    """The mesh the engine runs on: ``mesh``, or the one a tensor-parallel ``model`` is sharded over when
    ``mesh`` is None. Raises ``MeshError`` (before any device work) for a mesh that is not a
    ``sharding.make_mesh`` mesh, has data or fsdp axes > 1, does not fit the model's widths, or differs
    from the mesh the model is already sharded over."""
    have = model_mesh(model)
    if mesh is None:
        return have if getattr(model, "tp_layout", None) is not None else None
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != MESH_AXES:
        names = getattr(mesh, "axis_names", type(mesh).__name__)
        raise MeshError(f"the engine needs a mesh from sharding.make_mesh (axes {MESH_AXES}); got {names}")
    shape = mesh_shape(mesh)
    if shape["data"] * shape["fsdp"] > 1:
        raise MeshError(f"the serving engine runs tensor parallelism only; got data={shape['data']} x "
                        f"fsdp={shape['fsdp']} x tensor={shape['tensor']}. It packs a step's tokens into one row, "
                        "so data/fsdp axes would repeat the work: use make_mesh(tensor=N), one engine per replica")
    if have is not None and getattr(model, "tp_layout", None) is not None and have != mesh:
        raise MeshError(f"the model is already tensor-parallel over another mesh ({mesh_shape(have)}, devices "
                        f"{[d.id for d in have.devices.flat]}); pass that mesh, or the unsharded model")
    check_model_fits(model.cfg, mesh)
    return mesh


def place_model(model, mesh: Mesh | None):
    """``shard_model(model, mesh)`` unless the model already is sharded over ``mesh`` (or no mesh)."""
    if mesh is None:
        return model
    placed = model_mesh(model) == mesh and (tensor_degree(mesh) == 1 or getattr(model, "tp_layout", None) is not None)
    return model if placed else shard_model(model, mesh)


def replicate(tree, mesh: Mesh | None):
    """Host arrays -> the same arrays on every device of ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
