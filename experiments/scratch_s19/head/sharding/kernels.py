"""Pallas kernels per shard: ``shard_map`` wrappers that run a kernel on each device's slice.

The paged attention kernels (kernels_pallas/paged_attention.py: decode; ragged_paged_attention.py: chunked
prefill) run with the paged KV cache sharded over KV heads (pages [K, P, L, H] split on K over the tensor
axis), the fused dense decode attention (dense_decode_attention.py) with the dense [B, K, S, H] cache split the
same way, and the query heads split alike, so device g runs the kernel on its N/t query heads and K/t KV
heads -- no communication (GQA keeps query head n with KV head n // G, and both splits are contiguous).
Page tables, lengths and query offsets are replicated. Use them with a ``shard_model`` model (K' = max(K, t)
KV heads; ``partition.paged_cache_sharding`` places the pages).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, PartitionSpec as P

from .mesh import TENSOR, MeshError, mesh_shape

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
    from .rules import logical_to_spec

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


def _shard_map(body, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax
    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
