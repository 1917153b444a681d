"""Pallas kernels per shard: ``shard_map`` wrappers that run a kernel on each device's slice.

``sharded_paged_attention``: the paged decode-attention kernel (kernels_pallas/paged_attention.py) with the
paged KV cache sharded over KV heads (pages [K, P, L, H] split on K over the tensor axis) and the query heads
split the same way, so device g runs the kernel on its N/t query heads and K/t KV heads -- no
communication (GQA keeps query head n with KV head n // G, and both splits are contiguous). Lengths and
the page table are replicated. Use it with a ``shard_model`` model (K' = max(K, t) KV heads).
"""

from __future__ import annotations


import jax
from jax.sharding import Mesh, PartitionSpec as P

from .mesh import TENSOR, MeshError, mesh_shape


def sharded_paged_attention(mesh: Mesh, q, k_pages, v_pages, lengths, page_table, *, k_scales=None,
                            v_scales=None, scale=None, **kernel_kwargs):
    """q [B, N, H]; k_pages, v_pages [K, P, L, H] (int8 with k_scales, v_scales [K, P, L]); lengths [B];
    page_table [B, max_pages] -> [B, N, H] sharded over query heads. ``kernel_kwargs`` go to
    ``kernels_pallas.paged_attention.paged_attention`` (block sizes, backend, interpret)."""
    from kernels_pallas.paged_attention import check_decode_inputs, paged_attention

    check_decode_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales)
    t = mesh_shape(mesh).get(TENSOR, 1)
    n, k = q.shape[1], k_pages.shape[0]
    if n % t or k % t:
        raise MeshError(f"sharded_paged_attention: query heads N={n} and KV heads K={k} must both be multiples "
                        f"of the tensor degree {t} (shard_model repeats KV heads to K' = max(K, t))")
    heads, pages, rep = P(None, TENSOR, None), P(TENSOR), P()
    quant = k_scales is not None

    def body(q, kp, vp, lens, pt, *scales):
        ks, vs = scales if quant else (None, None)
        return paged_attention(q, kp, vp, lens, pt, k_scales=ks, v_scales=vs, scale=scale, **kernel_kwargs)

    args = (q, k_pages, v_pages, lengths, page_table) + ((k_scales, v_scales) if quant else ())
    specs = (heads, pages, pages, rep, rep) + ((pages, pages) if quant else ())
    fn = _shard_map(body, mesh, specs, heads)
    return fn(*args)


def _shard_map(body, mesh, in_specs, out_specs):
    if hasattr(jax, "shard_map"):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # older jax
    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
