"""THE table from logical axis names (what model code says) to mesh axes (what ``mesh.py`` builds).

Each logical name has one or more candidate mesh axes, tried in order; a candidate is taken when all its
mesh axes exist in the mesh, none is already used by an earlier dimension of the same array, and their
product divides that dimension. Mesh axes of size 1 are dropped. When no candidate fits, the dimension is
replicated -- e.g. ``kv_heads`` with K < tensor degree (``shard_model`` first repeats KV heads so K' is a
multiple of the tensor degree, so in practice each device holds the KV heads its query heads use), or a
decode batch of 1 over a data axis of 2. Model-width dimensions that *must* split (heads, MLP, vocab)
are checked up front by ``partition.check_model_fits`` with clear errors instead.

Parameters: ``embed`` is the FSDP axis (weights' D dimension is sharded for FSDP and all-gathered per
layer); heads/qkv/mlp/vocab are the tensor-parallel axes (column-parallel q/k/v, gate/up and LM head;
row-parallel o_proj and down_proj: one all-reduce after each). The embedding table is split along D
(``table_embed``) over fsdp and tensor. Activations use
``activation_embed`` for their D dimension, which stays replicated (the batch carries data and fsdp).

Quantized weights (kernels_pallas/quant_formats.py: int8 ``qweight[I, O]`` + ``scale[O]``; int4
``packed[I/2, O]`` + ``scale``/``zero`` ``[I/group, O]``) keep the output axis last and take their
module's axis names; W8A8 and K-major int8 (``Int8Weight.k_major``) store ``qweight[O, I]`` and name its axes
in the transposed order ``(out, in)``, so the same rules give the transposed spec; K-major int4
(``Int4Weight.k_major``) likewise stores ``packed[O, I/2]`` and ``scale``/``zero`` ``[O, I/group]``. ``quant_groups`` (the
I/group axis of int4 scales) and ``packed_embed`` (I/2) are listed so a QuantizedLinear that names them shards
its scales like its weights.
"""

from __future__ import annotations

from typing import Sequence

from jax.sharding import PartitionSpec

from .mesh import DATA, FSDP, TENSOR

# logical name -> candidates (a mesh axis, a tuple of mesh axes, or None = replicated), tried in order.
RULES: dict[str, tuple] = {
    # activations
    "batch": ((DATA, FSDP), DATA, FSDP),
    "sequence": (None,),
    "activation_embed": (None,),
    # attention
    "heads": (TENSOR,),  # N query heads (and the input rows of o_proj: N * H)
    "kv_heads": (TENSOR,),  # K kv heads (replicated when K is not a multiple of the tensor degree)
    "head_dim": (None,),
    "qkv": (TENSOR,),  # output columns of the fused q/k/v projection, in the per-shard layout (layout.py)
    # MLP, embedding, norms
    "mlp": (TENSOR,),  # F (and 2F of gate_up, in the per-shard [gate_g | up_g] layout)
    "vocab": (TENSOR,),
    "embed": (FSDP,),  # D of weights
    # the embedding table [V, D]: split along D, so a lookup gathers its rows locally and only the [B, T, D]
    # result is all-gathered (split along V, XLA's GPU partitioner all-gathered the whole 1.2 GB table of
    # GLM-4-9B at decode batch 1: 2.3 ms of a 9 ms tensor-parallel step on 2 H200s)
    "table_vocab": (None,),
    "table_embed": ((FSDP, TENSOR), TENSOR, FSDP),
    "norm": (None,),
    # quantized weights (see module docstring)
    "quant_groups": (None,),
    "packed_embed": (FSDP,),
    # paged KV cache [K, P, L, H]
    "pages": (None,),
    "page_slots": (None,),
}


class UnknownLogicalAxis(KeyError):
    pass


def _axes(candidate) -> tuple[str, ...]:
    if candidate is None:
        return ()
    return (candidate,) if isinstance(candidate, str) else tuple(candidate)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None, mesh_shape: dict[str, int],
                    rules: dict[str, tuple] = RULES) -> PartitionSpec:
    """Logical names of an array's dimensions (None = replicated) -> ``PartitionSpec`` for a mesh of
    ``mesh_shape`` ({axis: size}). ``shape`` (when given) is used to skip candidates that do not divide."""
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of rank {len(shape)} {tuple(shape)}")
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        chosen = None
        if name is not None:
            if name not in rules:
                raise UnknownLogicalAxis(f"logical axis {name!r} is not in the rules table; known: {sorted(rules)}")
            for cand in rules[name]:
                axes = tuple(a for a in _axes(cand) if mesh_shape.get(a, 1) > 1)
                if any(a not in mesh_shape for a in _axes(cand)) or used & set(axes):
                    continue
                size = 1
                for a in axes:
                    size *= mesh_shape[a]
                if shape is not None and shape[i] % size:
                    continue
                chosen = axes
                break
        if chosen:
            used |= set(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)
