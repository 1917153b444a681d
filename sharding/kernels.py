"""Pallas kernels per shard: ``shard_map`` wrappers that run a kernel on each device's slice.

The paged attention kernels (kernels_pallas/paged_attention.py: decode; ragged_paged_attention.py: chunked
prefill) run with the paged KV cache sharded over KV heads (pages [K, P, L, H] split on K over the tensor
axis), the fused dense decode attention (dense_decode_attention.py) with the dense [B, K, S, H] cache split the
same way, and the query heads split alike, so device g runs the kernel on its N/t query heads and K/t KV
heads -- no communication (GQA keeps query head n with KV head n // G, and both splits are contiguous).
Page tables, lengths and query offsets are replicated. Use them with a ``shard_model`` model (K' = max(K, t)
KV heads; ``partition.paged_cache_sharding`` places the pages).

The quantized matmul (``kernels_pallas.quantized_matmul``) runs per shard the same way (``sharded_quantized_matmul``,
what ``QuantizedLinear`` calls under a multi-device mesh): a column-parallel layer (output axis over the tensor
axis: q/k/v, gate/up, LM head) runs the kernel on its O/t output columns, no communication; a row-parallel one
(input axis over it: o_proj, down_proj) on its K/t input rows, the float32 partial products then summed across
the tensor axis (one all-reduce, as the float model's), the bias added once after. The batch is split over data /
fsdp as the rules say; an FSDP-sharded weight is gathered at the boundary. Without this a Pallas kernel is an
opaque custom call to XLA's SPMD partitioner, which would run it on operands gathered whole on every device.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from .mesh import TENSOR, MeshError, mesh_shape
from .rules import logical_to_spec

_HEADS, _PAGES, _REP = P(None, TENSOR, None), P(TENSOR), P()


def _check_heads(name: str, mesh: Mesh, n: int, k: int) -> None:
    t = mesh_shape(mesh).get(TENSOR, 1)
    if n % t or k % t:
        raise MeshError(f"{name}: query heads N={n} and KV heads K={k} must both be multiples of the tensor "
                        f"degree {t} (shard_model repeats KV heads to K' = max(K, t))")


def _per_shard(kernel, mesh: Mesh, q, k_pages, v_pages, replicated: tuple, k_scales, v_scales, kwargs):
    quant = k_scales is not None
    n_rep = len(replicated)

    def body(q, kp, vp, *rest):
        reps, scales = rest[:n_rep], rest[n_rep:]
        ks, vs = scales if quant else (None, None)
        return kernel(q, kp, vp, *reps, k_scales=ks, v_scales=vs, **kwargs)

    args = (q, k_pages, v_pages) + replicated + ((k_scales, v_scales) if quant else ())
    specs = (_HEADS, _PAGES, _PAGES) + (_REP,) * n_rep + ((_PAGES, _PAGES) if quant else ())
    return _shard_map(body, mesh, specs, _HEADS)(*args)


def sharded_paged_attention(mesh: Mesh, q, k_pages, v_pages, lengths, page_table, *, k_scales=None,
                            v_scales=None, **kernel_kwargs):
    """Decode: q [B, N, H]; k_pages, v_pages [K, P, L, H] (int8 with k_scales, v_scales [K, P, L]); lengths [B];
    page_table [B, max_pages] -> [B, N, H] sharded over query heads. ``kernel_kwargs`` (scale, block sizes,
    backend, interpret) go to ``kernels_pallas.paged_attention.paged_attention``."""
    from kernels_pallas.paged_attention import check_decode_inputs, paged_attention

    check_decode_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales)
    _check_heads("sharded_paged_attention", mesh, q.shape[1], k_pages.shape[0])
    return _per_shard(paged_attention, mesh, q, k_pages, v_pages, (lengths, page_table), k_scales, v_scales,
                      kernel_kwargs)


def sharded_ragged_paged_attention(mesh: Mesh, q, k_pages, v_pages, page_table, context_lens, query_start,
                                   num_seqs, *, k_scales=None, v_scales=None, **kernel_kwargs):
    """Chunked prefill: q [T, N, H] packed tokens; the rest as ``kernels_pallas.ragged_paged_attention`` ->
    [T, N, H] sharded over query heads."""
    from kernels_pallas.ragged_paged_attention import check_ragged_inputs, ragged_paged_attention

    check_ragged_inputs(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales, v_scales)
    _check_heads("sharded_ragged_paged_attention", mesh, q.shape[1], k_pages.shape[0])
    num_seqs = jax.numpy.asarray(num_seqs, jax.numpy.int32).reshape(1)
    return _per_shard(ragged_paged_attention, mesh, q, k_pages, v_pages,
                      (page_table, context_lens, query_start, num_seqs), k_scales, v_scales, kernel_kwargs)


def sharded_dense_decode_attention(mesh, q, k_new, v_new, cache_k, cache_v, positions, **kernel_kwargs):
    """Fused dense decode attention (``kernels_pallas.dense_decode_attention``) per shard: q [B, N, H] and
    k_new, v_new [B, K, H] split over heads, the caches [B, K, S, H] as ``partition.kv_cache_sharding`` places
    them (batch over data/fsdp, KV heads over tensor), positions [B] with the batch. ``mesh``: a Mesh or the
    active AbstractMesh. Returns (out [B, N, H], cache_k, cache_v) sharded the same way."""
    from kernels_pallas.dense_decode_attention import check_inputs, dense_decode_attention

    from .partition import DENSE_CACHE_AXES

    check_inputs(q, k_new, v_new, cache_k, cache_v, positions)
    # K a multiple of the tensor degree: the rules split the caches' KV heads with the query heads
    _check_heads("sharded_dense_decode_attention", mesh, q.shape[1], cache_k.shape[1])
    shape = dict(mesh.shape)
    spec = lambda names, x: logical_to_spec(names, x.shape, shape)
    cache = spec(DENSE_CACHE_AXES, cache_k)
    heads, kv = spec(("batch", "heads", None), q), spec(("batch", "kv_heads", None), k_new)
    pos = spec(("batch",), positions)
    body = lambda *a: dense_decode_attention(*a, **kernel_kwargs)
    return _shard_map(body, mesh, (heads, kv, kv, cache, cache, pos), (heads, cache, cache))(
        q, k_new, v_new, cache_k, cache_v, positions)


# ------------------------------------------------------------------------------ quantized matmul
def _on_tensor(entry) -> bool:
    return entry == TENSOR or (isinstance(entry, tuple) and TENSOR in entry)


def quantized_shard_plan(qweight, axes: tuple, mesh_shape: dict) -> str | None:
    """How ``sharded_quantized_matmul`` splits a layer whose weight (``kernels_pallas.quant_formats``) has the
    logical (in, out) axes ``axes`` over a mesh of ``mesh_shape`` ({axis: size}): "column" (the output axis over
    the tensor axis), "row" (the input axis), "replicated" (neither: only the batch is split), or None where no
    per-shard kernel can serve: a row-parallel int4 weight whose K / t is not a multiple of its group (a shard would
    start inside a scale group; GLM-4-9B's down_proj, K = 13696 = 107 groups of 128, at t = 2)."""
    from kernels_pallas.quant_formats import Int4Weight

    k, n, t = qweight.in_features, qweight.out_features, mesh_shape.get(TENSOR, 1)
    spec = tuple(logical_to_spec(tuple(axes), (k, n), mesh_shape)) + (None, None)
    if _on_tensor(spec[1]):
        return "column"
    if not _on_tensor(spec[0]):
        return "replicated"
    if isinstance(qweight, Int4Weight) and k % (t * qweight.group):
        return None
    return "row"


def _weight_specs(qweight, plan: str):
    """The weight pytree's shard_map specs: the tensor axis on O (column) or I (row) of each stored array, nothing
    else (int4 scales / zero points stay whole along I/group; the body takes its device's groups)."""
    from kernels_pallas.quant_formats import Int4Weight, W8A8Weight

    i, o = (TENSOR if plan == "row" else None), (TENSOR if plan == "column" else None)
    transposed = isinstance(qweight, W8A8Weight) or getattr(qweight, "k_major", False)
    stored = P(o, i) if transposed else P(i, o)  # qweight / packed: [O, I(/2)] or [I(/2), O]
    if isinstance(qweight, Int4Weight):
        groups = P(o, None) if transposed else P(None, o)
        return dataclasses.replace(qweight, packed=stored, scale=groups,
                                   zero=None if qweight.zero is None else groups)
    return dataclasses.replace(qweight, qweight=stored, scale=P(o))


def _device_groups(qweight, shards: int):
    """Inside the body of a row-parallel int4 call: this device's K / t / group scale (and zero) groups."""
    from kernels_pallas.quant_formats import Int4Weight

    if not isinstance(qweight, Int4Weight):
        return qweight
    axis = 1 if qweight.k_major else 0
    count = qweight.scale.shape[axis] // shards
    take = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(
        a, jax.lax.axis_index(TENSOR) * count, count, axis=axis)
    return dataclasses.replace(qweight, scale=take(qweight.scale), zero=take(qweight.zero))


def sharded_quantized_matmul(mesh, x, qweight, axes: tuple, *, bias=None, out_dtype=None, act_scale=None,
                             **kernel_kwargs):
    """``kernels_pallas.quantized_matmul`` per shard (module docstring): x [..., I] -> [..., O], the output split
    over the tensor axis for a column-parallel layer. ``mesh``: a Mesh or the active AbstractMesh; ``axes``: the
    layer's logical (in, out) axes (those of its ``Linear``); ``kernel_kwargs`` (impl, interpret, config) go to the
    kernel, which computes its own activation digits and takes the whole local K (``k_blocks`` 1). Raises
    ``MeshError`` where ``quantized_shard_plan`` gives None."""
    from kernels_pallas.quantized_matmul import quantized_matmul, validate_inputs

    validate_inputs(x, qweight, bias, out_dtype, act_scale)
    shape = dict(mesh.shape)
    plan = quantized_shard_plan(qweight, axes, shape)
    if plan is None:
        raise MeshError(f"sharded_quantized_matmul: an int4 weight with K={qweight.in_features} and group "
                        f"{qweight.group} cannot be split row-parallel over tensor degree {shape.get(TENSOR, 1)} "
                        f"(K / t must be a multiple of the group); run it on an XLA path (impl='xla')")
    t = shape.get(TENSOR, 1)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    batch = tuple(logical_to_spec(("batch",), x.shape[:1], shape)) if x.ndim > 1 else ()
    lead = (batch[0] if batch else None,) + (None,) * (x.ndim - 2) if x.ndim > 1 else ()
    x_spec = P(*lead, TENSOR if plan == "row" else None)
    out_spec = P(*lead, TENSOR if plan == "column" else None)
    extra = {name: a for name, a in (("bias", bias), ("act_scale", act_scale)) if a is not None}
    extra_specs = {name: (P(TENSOR) if name == "bias" and plan == "column" else P()) for name in extra}

    def body(x, w, extra):
        if plan != "row":
            return quantized_matmul(x, w, out_dtype=out_dtype, **extra, **kernel_kwargs)
        y = quantized_matmul(x, _device_groups(w, t), out_dtype=jnp.float32, act_scale=extra.get("act_scale"),
                             **kernel_kwargs)
        y = jax.lax.psum(y, TENSOR)  # the row-parallel all-reduce, of float32 partial products
        return (y if bias is None else y + extra["bias"].astype(jnp.float32)).astype(out_dtype)

    return _shard_map(body, mesh, (x_spec, _weight_specs(qweight, plan), extra_specs), out_spec)(x, qweight, extra)


def _shard_map(body, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax
    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
