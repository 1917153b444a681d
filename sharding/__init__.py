"""Sharding for autoglm-jax: meshes, the logical-axis rules table, sharded models, caches and checkpoints.

Typical use::

    from sharding import make_mesh, shard_model
    mesh = make_mesh(tensor=2)                  # (data, fsdp, tensor) over the local devices
    model = shard_model(model, mesh)            # tensor-parallel layout + sharded params
    tokens = autoglm_jax.generate(model, prompts)   # jit + GSPMD: nothing else changes

or ``from_pretrained_sharded(path, make_mesh(tensor=2))`` to read a checkpoint straight into its shards.
Modules: mesh (meshes, multi-process init), launch (N processes of one runtime on one host), rules (THE logical -> mesh axis table), layout (the tensor-parallel
column layout of the fused projections), partition (shardings, ``shard_model``, ``constrain``),
checkpoint (sharded Orbax save/restore, HF -> sharded), kernels (Pallas kernels per shard via shard_map).
"""

from .checkpoint import from_pretrained_sharded, load_hf_sharded, restore_sharded, save_sharded
from .kernels import sharded_paged_attention, sharded_quantized_matmul, sharded_ragged_paged_attention
from .mesh import MESH_AXES, MeshError, initialize_distributed, make_mesh
from .partition import (batch_sharding, cache_shardings, check_model_fits, constrain, kv_cache_sharding,
                        logical_axes, mesh_of, on_one_device, paged_cache_sharding, param_shardings, per_device_bytes,
                        shard_model, sharding_fn_for, shardings_like, use_mesh)
from .rules import RULES, logical_to_spec

__all__ = ["MESH_AXES", "MeshError", "RULES", "batch_sharding", "cache_shardings", "check_model_fits", "constrain",
           "from_pretrained_sharded", "sharded_paged_attention", "sharded_quantized_matmul",
           "sharded_ragged_paged_attention",
           "initialize_distributed", "kv_cache_sharding", "load_hf_sharded", "logical_axes", "logical_to_spec",
           "make_mesh", "mesh_of", "on_one_device", "paged_cache_sharding", "param_shardings", "per_device_bytes",
           "restore_sharded", "save_sharded", "shard_model", "sharding_fn_for", "shardings_like", "use_mesh"]
