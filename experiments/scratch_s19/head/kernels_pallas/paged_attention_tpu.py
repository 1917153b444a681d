"""Paged attention on TPU (Pallas Mosaic TPU): the decode kernel and the pieces the ragged prefill kernel shares.

Written for TPU and exercised here only in interpret mode (no TPU to run on). Grid (rows, K, max_pages): one
page per step, the pipeline prefetching the next page (scalar-prefetched lengths and page table pick it) while
this one computes; an online softmax in float32 scratch (m, l [R, 1], acc [R, H]). Pages past a sequence's
length repeat its last page, so no new DMA is issued for them. The GPU kernels and the dispatch live in
``paged_attention.py``; ``paged_attention_reference`` there is the truth for both.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .paged_attention import MASK_VALUE, _drop_aliased_inputs


def _decode_tpu_kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, *refs, page_size, max_pages, scale, quantized):
    # Mosaic TPU, grid (B, K, max_pages): one page per step (the pipeline prefetches the next page while
    # this one computes); q_ref [G, H]; k_ref, v_ref [L, H]; scales [1, L]; o_ref [G, H];
    # scratch m, l [G, 1], acc [G, H] float32.
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]  # int8 pages put (k scales, v scales) first
    b, p = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]

    @pl.when(p == 0)
    def _init():
        tpu_init(m_ref, l_ref, acc_ref)

    @pl.when(p * page_size < length)
    def _page():
        tpu_page_step(q_ref, k_ref, v_ref, refs[:2] if quantized else None, m_ref, l_ref, acc_ref,
                      page_start=p * page_size, limit=length, scale=scale)

    @pl.when(p == max_pages - 1)
    def _done():
        tpu_finish(o_ref, l_ref, acc_ref)


def tpu_init(m_ref, l_ref, acc_ref):
    """Online-softmax state before the first page (the Mosaic TPU kernels)."""
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)


def tpu_page_step(q_ref, k_ref, v_ref, scale_refs, m_ref, l_ref, acc_ref, *, page_start, limit, scale,
                  query_pos=None):
    """One page of the online softmax (the Mosaic TPU kernels): q_ref [rows, H]; k_ref, v_ref [L, H];
    scale_refs = (k scales, v scales) [1, L] for int8 pages, else None. Key page_start + i counts when it is
    < limit and, if ``query_pos(shape)`` gives each row's position, when it is <= that position (causal)."""
    q = q_ref[...]
    k = k_ref[...].astype(q.dtype)
    v = v_ref[...].astype(q.dtype)
    logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if scale_refs is not None:
        logits = logits * scale_refs[0][...]
    key = page_start + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
    valid = key < limit
    if query_pos is not None:
        valid = (key <= query_pos(logits.shape)) & valid
    logits = jnp.where(valid, logits * scale, MASK_VALUE)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    probs = jnp.exp(logits - m_new)
    l_ref[...] = l_ref[...] * alpha + jnp.sum(probs, axis=1, keepdims=True)
    if scale_refs is not None:
        probs = probs * jnp.where(key[:1] < limit, scale_refs[1][...], 0.0)
    v = jnp.where(page_start + lax.broadcasted_iota(jnp.int32, v.shape, 0) < limit, v, jnp.zeros((), v.dtype))
    acc_ref[...] = acc_ref[...] * alpha + lax.dot_general(probs.astype(q.dtype), v, (((1,), (0,)), ((), ())),
                                                          preferred_element_type=jnp.float32)
    m_ref[...] = m_new


def tpu_finish(o_ref, l_ref, acc_ref):
    """The output rows after the last page: acc / l (0 where no key counted)."""
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def tpu_paged_call(kernel, page, qx, q_spec, k_pages, v_pages, k_scales, v_scales, *, prefetch, grid, interpret,
                   poison, name):
    """The launch both Mosaic TPU kernels (decode, ragged prefill) share. ``qx`` [rows0, K, R, H] with its
    ``q_spec``; K/V pages [K, P, L, H] (and int8 scales [K, P, L]) arrive one page per grid step (i, k, p) at
    ``page(i, p, *prefetch)``; ``prefetch``: the two scalar-prefetch operands; scratch m, l [R, 1] and
    acc [R, H] float32 for the online softmax; with ``poison`` the output aliases a NaN-filled buffer."""
    from jax.experimental.pallas import tpu as pltpu

    kv_heads, num_pages, page_size, head_dim = k_pages.shape
    rows = qx.shape[2]
    kv_spec = pl.BlockSpec((None, None, page_size, head_dim), lambda i, k, p, *pf: (k, page(i, p, *pf), 0, 0))
    in_specs, args = [q_spec, kv_spec, kv_spec], [qx, k_pages, v_pages]
    if k_scales is not None:
        sc_spec = pl.BlockSpec((None, None, 1, page_size), lambda i, k, p, *pf: (k, page(i, p, *pf), 0, 0))
        in_specs += [sc_spec] * 2
        args += [k_scales.reshape(kv_heads, num_pages, 1, page_size), v_scales.reshape(kv_heads, num_pages, 1, page_size)]
    aliases = {}
    if poison:
        args.append(jnp.full(qx.shape, jnp.nan, qx.dtype))
        in_specs.append(q_spec)
        aliases = {len(args) + len(prefetch) - 1: 0}  # operand index counts the scalar-prefetch operands
        kernel = _drop_aliased_inputs(kernel, 1, n_scratch=3)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(prefetch), grid=grid, in_specs=in_specs, out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                        pltpu.VMEM((rows, head_dim), jnp.float32)])
    return pl.pallas_call(
        kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(qx.shape, qx.dtype), input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret, name=name,
    )(*prefetch, *args)


def decode_tpu(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, *, scale, interpret, poison):
    """Mosaic TPU decode: written for TPU, exercised here only in interpret mode (no TPU to run on)."""
    batch, n, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    group, max_pages = n // kv_heads, page_table.shape[1]
    quantized = k_scales is not None

    def page(b, p, lens, pt):  # pages past the length repeat the last one: no new DMA is issued
        last = jnp.maximum((lens[b] + page_size - 1) // page_size - 1, 0)
        return jnp.clip(pt[b * max_pages + jnp.minimum(p, last)], 0, num_pages - 1)

    q_spec = pl.BlockSpec((None, None, group, head_dim), lambda b, k, p, lens, pt: (b, k, 0, 0))
    kernel = functools.partial(_decode_tpu_kernel, page_size=page_size, max_pages=max_pages, scale=scale,
                               quantized=quantized)
    out = tpu_paged_call(kernel, page, q.reshape(batch, kv_heads, group, head_dim), q_spec, k_pages, v_pages,
                         k_scales, v_scales, prefetch=(lengths, page_table.reshape(-1)), grid=(batch, kv_heads, max_pages),
                         interpret=interpret, poison=poison, name="paged_decode_tpu")
    return out.reshape(q.shape)
