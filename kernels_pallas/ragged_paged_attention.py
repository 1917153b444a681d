"""Ragged (chunked-prefill) paged attention: packed query tokens of several sequences over the paged cache.

Public: ``ragged_paged_attention`` (dispatch), ``ragged_paged_attention_reference`` (plain jnp, the truth).

Sequence b's query tokens are q[query_start[b]:query_start[b+1]]; they are the LAST tokens of its
context (context_lens[b] tokens are in the cache, the chunk's own k/v included), so query i of a chunk
of length n sits at position context_lens[b] - n + i and sees keys 0..that position.

GPU kernel (Pallas, Triton lowering; grid (query blocks, K)): the packed tokens are cut into blocks of
``block_q`` tokens that never straddle two sequences (a small XLA prologue maps each grid row to
(sequence, first token, end token)); one program takes a block's tokens times the G query heads of one
kv head as its [block_q * G, H] row tile, so each K/V page of that head is loaded once for all of them,
and streams ``pages_per_block`` pages at a time up to the block's last causal key, online softmax in
float32. Kv blocks wholly before the block's first query run an unmasked loop; the diagonal ones (and the partial
page past the last key) a masked one. Grid rows past the real blocks cover the padding tokens (past query_start[num_seqs]) and write
zeros; int8 pages are dequantized in the kernel as in the decode kernel. Block sizes: block_q, pages_per_block,
num_warps, num_stages and row_gather (K/V as 2-D pool-row gathers, as in the decode kernel; the H100 table keeps
page tiles here).

Hopper: ``backend="mosaic_gpu"`` runs ``ragged_paged_attention_mgpu.py`` (TMA page copies, wgmma, a loader
warpgroup). It is the default on a Hopper GPU wherever the inputs fit it (bfloat16 / float16 pages, no Triton-only
block options, shared memory), 1.37x the Triton kernel at 512-token chunks, context 4096
(``experiments/results/paged_variants/s19/prefill_mgpu_h100.json``); it needs finite values in unowned page slots
(the engine's pool starts as zeros and only holds the model's K / V).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .kv_pages import _is_concrete, page_geometry, validate_page_table
from .paged_attention import (LOG2E, MASK_VALUE, _drop_aliased_inputs, _pow2, _select_backend, fast_exp2,
                              gather_pages, pool_operands, pool_rows, tuned_blocks)
from .paged_attention_tpu import tpu_finish, tpu_init, tpu_page_step, tpu_paged_call


# ----------------------------------------------------------------------------------------- reference
def ragged_paged_attention_reference(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, *,
                                     k_scales=None, v_scales=None, scale=None):
    """Chunked-prefill attention in plain jnp (float32 math). q [T, N, H] -> [T, N, H]; padding rows are 0."""
    t_total, n, h = q.shape
    kv_heads = k_pages.shape[0]
    scale = h ** -0.5 if scale is None else scale
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(-1)[0]
    seqs = jnp.arange(page_table.shape[0])
    tok = jnp.arange(t_total)
    # Sequence of each token (padding tokens -> no sequence).
    in_seq = (tok[:, None] >= query_start[None, :-1]) & (tok[:, None] < query_start[None, 1:])
    in_seq &= (seqs < num_seqs)[None, :]  # [T, B]
    has_seq = in_seq.any(axis=1)
    seq = jnp.argmax(in_seq, axis=1)
    pos = context_lens[seq] - (query_start[seq + 1] - tok)  # absolute position of each query token
    k = gather_pages(k_pages, page_table, k_scales)[seq]  # [T, S, K, H]
    v = gather_pages(v_pages, page_table, v_scales)[seq]
    key = jnp.arange(k.shape[1])
    valid = (key[None, :] <= pos[:, None]) & (key[None, :] < context_lens[seq][:, None]) & has_seq[:, None]
    k = jnp.where(valid[:, :, None, None], k, 0.0)
    v = jnp.where(valid[:, :, None, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(t_total, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("tkgh,tskh->tkgs", qg, k, precision="highest") * scale
    logits = jnp.where(valid[:, None, None, :], logits, MASK_VALUE)
    out = jnp.einsum("tkgs,tskh->tkgh", jax.nn.softmax(logits, axis=-1), v, precision="highest")
    out = jnp.where(has_seq[:, None, None, None], out, 0.0)
    return out.reshape(t_total, n, h).astype(q.dtype)


# ----------------------------------------------------------------------------------------- GPU kernel
def _block_map(query_start, num_seqs, t_total, block_q, n_blocks):
    """[n_blocks, 4] int32 rows (sequence, first token, end token, is_padding) for the grid's query blocks."""
    b = query_start.shape[0] - 1
    q_lens = jnp.where(jnp.arange(b) < num_seqs, query_start[1:] - query_start[:-1], 0)
    per_seq = (q_lens + block_q - 1) // block_q
    cum = jnp.cumsum(per_seq)
    real = cum[-1]
    j = jnp.arange(n_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cum, j, side="right"), b - 1).astype(jnp.int32)
    t0 = query_start[seq] + (j - (cum[seq] - per_seq[seq])) * block_q
    t1 = jnp.minimum(t0 + block_q, query_start[seq + 1])
    pad = j >= real
    pad_t0 = query_start[num_seqs] + (j - real) * block_q
    t0 = jnp.where(pad, pad_t0, t0)
    t1 = jnp.where(pad, jnp.minimum(pad_t0 + block_q, t_total), t1)
    return jnp.stack([seq, t0, t1, pad.astype(jnp.int32)], axis=1).astype(jnp.int32)


def _prefill_kernel(meta_ref, ctx_ref, qs_ref, pt_ref, q_ref, k_ref, v_ref, *refs, group, group_pad, block_q,
                    page_size, pages_per_block, num_pages, max_pages, scale, quantized, row_gather, interpret):
    # meta_ref [n_blocks, 4]; ctx_ref [B]; qs_ref [B+1]; pt_ref [B, max_pages]; q_ref, o_ref [T, N, H];
    # k_ref, v_ref [P, L, H] (head k), scales [P, L]; row_gather: [P * L, H] and [P * L] (pool_rows).
    if quantized:
        ks_ref, vs_ref, o_ref = refs
    else:
        (o_ref,) = refs
    j, kh = pl.program_id(0), pl.program_id(1)
    head_dim = q_ref.shape[-1]
    rows = block_q * group_pad
    block = pages_per_block * page_size
    seq, t0, t1, pad = meta_ref[j, 0], meta_ref[j, 1], meta_ref[j, 2], meta_ref[j, 3]
    ctx = ctx_ref[seq]
    q_end = qs_ref[seq + 1]
    kv_end = jnp.where(pad == 1, 0, jnp.minimum(ctx - q_end + t1, ctx))  # last causal key + 1
    n_pages = jnp.minimum((jnp.maximum(kv_end, 0) + page_size - 1) // page_size, max_pages)
    n_iter = (n_pages + pages_per_block - 1) // pages_per_block

    tok3 = t0 + lax.broadcasted_iota(jnp.int32, (block_q, group_pad, head_dim), 0)
    head3 = lax.broadcasted_iota(jnp.int32, (block_q, group_pad, head_dim), 1)
    io_ok = (tok3 < t1) & (head3 < group)
    q_at = q_ref.at[pl.ds(t0, block_q), pl.ds(kh * group, group_pad), :]
    q = pltriton.load(q_at, mask=io_ok, other=0).reshape(rows, head_dim)
    cdt = q.dtype
    q_pos = ctx - q_end + t0 + lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group_pad  # [rows, 1]
    c = scale * LOG2E

    def body(i, carry, masked):
        acc, m, l = carry
        pstart = i * pages_per_block
        if row_gather:
            ids = pool_rows(pt_ref, seq, pstart, pages_per_block=pages_per_block, page_size=page_size,
                            n_pages=n_pages, max_pages=max_pages, num_pages=num_pages)
        elif masked:
            page_ok = pstart + jnp.arange(pages_per_block) < n_pages
            ids = pltriton.load(pt_ref.at[seq, pl.ds(pstart, pages_per_block)], mask=page_ok, other=0)
            ids = jnp.where(page_ok, ids, 0)
        else:  # every page of the block is below n_pages
            ids = pt_ref[seq, pl.ds(pstart, pages_per_block)]
        if not row_gather:
            ids = jnp.clip(ids, 0, num_pages - 1)
        k = k_ref[ids].reshape(block, head_dim)
        v = v_ref[ids].reshape(block, head_dim)
        logits = lax.dot_general(q, k.astype(cdt), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if quantized:
            logits = logits * ks_ref[ids].reshape(1, block)
        if masked:
            key = pstart * page_size + lax.broadcasted_iota(jnp.int32, (1, block), 1)
            logits = jnp.where((key <= q_pos) & (key < kv_end), logits, MASK_VALUE)  # [rows, block]
        # m is in log2 units: the scale is applied to the row max, then to each logit inside one multiply-add
        m_new = jnp.maximum(m, jnp.max(logits, axis=1) * c)
        alpha = fast_exp2(m - m_new, interpret)
        p = fast_exp2(logits * c - m_new[:, None], interpret)
        l = l * alpha + jnp.sum(p, axis=1)
        v = v.astype(cdt)
        if masked:
            key_ok = pstart * page_size + jnp.arange(block) < kv_end
            v = jnp.where(key_ok[:, None], v, jnp.zeros((), cdt))
        if quantized:
            v_scale = vs_ref[ids].reshape(1, block)
            p = p * (jnp.where(key_ok[None, :], v_scale, 0.0) if masked else v_scale)
        acc = acc * alpha[:, None] + lax.dot_general(p.astype(cdt), v, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.float32)
        return acc, m_new, l

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    # Blocks whose keys every row of this block sees (all below its first query's position) skip the
    # causal mask; the rest (the diagonal and the page past kv_end) take the masked body.
    n_full = jnp.clip(jnp.minimum((ctx - q_end + t0 + 1) // block, n_pages // pages_per_block), 0, n_iter)
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init)
    acc, _, l = lax.fori_loop(n_full, n_iter, functools.partial(body, masked=True), carry)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    o_at = o_ref.at[pl.ds(t0, block_q), pl.ds(kh * group, group_pad), :]
    pltriton.store(o_at, out.reshape(block_q, group_pad, head_dim).astype(o_ref.dtype), mask=io_ok)


def prefill_blocks(group, page_size, quantized, tokens, **given) -> dict:
    blocks = {k: v for k, v in given.items() if v is not None}
    if len(blocks) < 5:
        key, tuned = tuned_blocks("prefill", page_size=page_size, quantized=quantized, group=group, batch=1,
                                  context=tokens)
        if tuned:  # tokens per kv block and query rows carry over to other page sizes / groups
            tuned["pages_per_block"] = max(1, tuned["pages_per_block"] * key["page_size"] // page_size)
            tuned["block_q"] = max(1, tuned["block_q"] * _pow2(key["group"]) // _pow2(group))
        default = dict(block_q=max(1, 256 // _pow2(group)), pages_per_block=max(1, 64 // page_size),
                       num_warps=8, num_stages=4, row_gather=False)
        blocks = {**default, **tuned, **blocks}
    for name in ("block_q", "pages_per_block"):
        if blocks[name] < 1 or blocks[name] & (blocks[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 1; got {blocks[name]}")
    if blocks["block_q"] * _pow2(group) < 16:
        raise ValueError(f"block_q * G must be >= 16 (tensor-core rows); got block_q={blocks['block_q']}, G={group}")
    return {**{k: int(v) for k, v in blocks.items() if k != "row_gather"},
            "row_gather": bool(blocks.get("row_gather", False))}


def _prefill_triton(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales, v_scales, *,
                    scale, blocks, interpret, poison):
    t_total, n, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    group = n // kv_heads
    group_pad = _pow2(group)
    block_q, ppb = blocks["block_q"], blocks["pages_per_block"]
    n_blocks = -(-t_total // block_q) + page_table.shape[0]
    meta = _block_map(query_start, num_seqs, t_total, block_q, n_blocks)
    quantized = k_scales is not None
    kernel = functools.partial(
        _prefill_kernel, group=group, group_pad=group_pad, block_q=block_q, page_size=page_size,
        pages_per_block=ppb, num_pages=num_pages, max_pages=page_table.shape[1], scale=scale, quantized=quantized,
        row_gather=blocks["row_gather"], interpret=interpret)
    whole = pl.BlockSpec()
    pools, pool_specs = pool_operands(k_pages, v_pages, k_scales, v_scales, blocks["row_gather"])
    in_specs = [whole] * 5 + pool_specs
    args = [meta, context_lens, query_start, page_table, q] + pools
    aliases = {}
    if poison:
        args.append(jnp.full(q.shape, jnp.nan, q.dtype))
        in_specs.append(whole)
        aliases = {len(args) - 1: 0}
        kernel = _drop_aliased_inputs(kernel, 1)
    return pl.pallas_call(
        kernel, grid=(n_blocks, kv_heads), in_specs=in_specs, out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=blocks["num_warps"], num_stages=blocks["num_stages"]),
        interpret=interpret, name=f"ragged_paged_prefill_g{group}_l{page_size}_bq{block_q}_ppb{ppb}",
    )(*args)


# ----------------------------------------------------------------------------------------- TPU kernel
def _prefill_tpu_kernel(meta_ref, pt_ref, q_ref, k_ref, v_ref, *refs, group, page_size, max_pages, scale,
                        quantized):
    # Mosaic TPU, grid (query blocks, K, max_pages), one page per step. meta_ref [n_blocks * 4] =
    # (sequence, position of the block's first token, kv_end, padding); q_ref, o_ref [block_q * G, H]
    # (row r = token r // G, head r % G); k_ref, v_ref [L, H]; scales [1, L]; scratch m, l, acc.
    o_ref, m_ref, l_ref, acc_ref = refs[-4:]  # int8 pages put (k scales, v scales) first
    j, p = pl.program_id(0), pl.program_id(2)
    pos0, kv_end = meta_ref[4 * j + 1], meta_ref[4 * j + 2]

    @pl.when(p == 0)
    def _init():
        tpu_init(m_ref, l_ref, acc_ref)

    @pl.when(p * page_size < kv_end)
    def _page():
        tpu_page_step(q_ref, k_ref, v_ref, refs[:2] if quantized else None, m_ref, l_ref, acc_ref,
                      page_start=p * page_size, limit=kv_end, scale=scale,
                      query_pos=lambda shape: pos0 + lax.broadcasted_iota(jnp.int32, shape, 0) // group)

    @pl.when(p == max_pages - 1)
    def _done():
        tpu_finish(o_ref, l_ref, acc_ref)


def _prefill_tpu(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales, v_scales, *,
                 scale, block_q, interpret, poison):
    """Mosaic TPU prefill: written for TPU, exercised here only in interpret mode (no TPU to run on).
    Query blocks are gathered into an aligned [blocks, K, block_q * G, H] layout by XLA around the kernel."""
    t_total, n, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    group, max_pages = n // kv_heads, page_table.shape[1]
    n_blocks = -(-t_total // block_q) + page_table.shape[0]
    meta = _block_map(query_start, num_seqs, t_total, block_q, n_blocks)
    seq, t0, t1, pad = meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3]
    q_end, ctx = query_start[seq + 1], context_lens[seq]
    kv_end = jnp.where(pad == 1, 0, jnp.minimum(ctx - q_end + t1, ctx))
    tpu_meta = jnp.stack([seq, ctx - q_end + t0, kv_end, pad], axis=1).reshape(-1).astype(jnp.int32)
    tok = jnp.clip(t0[:, None] + jnp.arange(block_q)[None, :], 0, t_total - 1)  # [blocks, block_q]
    qb = q[tok].reshape(n_blocks, block_q, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    qb = qb.reshape(n_blocks, kv_heads, block_q * group, head_dim)
    quantized = k_scales is not None

    def page(j, p, meta, pt):  # pages past kv_end repeat the last one: no new DMA is issued
        last = jnp.maximum((meta[4 * j + 2] + page_size - 1) // page_size - 1, 0)
        return jnp.clip(pt[meta[4 * j] * max_pages + jnp.minimum(p, last)], 0, num_pages - 1)

    q_spec = pl.BlockSpec((None, None, block_q * group, head_dim), lambda j, k, p, meta, pt: (j, k, 0, 0))
    kernel = functools.partial(_prefill_tpu_kernel, group=group, page_size=page_size, max_pages=max_pages,
                               scale=scale, quantized=quantized)
    ob = tpu_paged_call(kernel, page, qb, q_spec, k_pages, v_pages, k_scales, v_scales,
                        prefetch=(tpu_meta, page_table.reshape(-1)), grid=(n_blocks, kv_heads, max_pages),
                        interpret=interpret, poison=poison, name="ragged_paged_prefill_tpu")
    # Back to token order: token t is row (t - t0[j]) of the block j that holds it.
    ob = ob.reshape(n_blocks, kv_heads, block_q, group, head_dim).transpose(0, 2, 1, 3, 4)
    ob = ob.reshape(n_blocks * block_q, n, head_dim)
    t = jnp.arange(t_total)
    j_of_t = jnp.clip(jnp.searchsorted(jnp.where(pad == 1, t_total + 1, t1), t, side="right"), 0, n_blocks - 1)
    real = (t >= t0[j_of_t]) & (t < t1[j_of_t]) & (pad[j_of_t] == 0)
    out = ob[j_of_t * block_q + jnp.clip(t - t0[j_of_t], 0, block_q - 1)]
    return jnp.where(real[:, None, None], out, jnp.zeros((), q.dtype))


# ----------------------------------------------------------------------------------------- dispatch
def on_hopper() -> bool:
    """Whether jax's default device is a Hopper GPU (compute capability 9.x), where the Mosaic GPU kernel runs."""
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


@functools.partial(jax.jit, static_argnames=("scale", "block_q", "pages_per_block", "num_warps", "num_stages",
                                             "row_gather", "backend", "interpret", "poison"))
def _ragged_paged_attention(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales,
                            v_scales, *, scale, block_q, pages_per_block, num_warps, num_stages, row_gather,
                            backend, interpret, poison):
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(-1)[0]
    if backend == "reference":
        return ragged_paged_attention_reference(q, k_pages, v_pages, page_table, context_lens, query_start,
                                                num_seqs, k_scales=k_scales, v_scales=v_scales, scale=scale)
    kv_heads, _, page_size, _ = k_pages.shape
    if backend == "mosaic_gpu":
        from .ragged_paged_attention_mgpu import prefill
        return prefill(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, scale=scale,
                       block_q=block_q, pages_per_block=pages_per_block, stages=num_stages, interpret=interpret)
    if backend == "mosaic_tpu":
        group = q.shape[1] // kv_heads
        bq = block_q or max(1, 128 // group)
        return _prefill_tpu(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales,
                            v_scales, scale=scale, block_q=bq, interpret=interpret, poison=poison)
    blocks = prefill_blocks(q.shape[1] // kv_heads, page_size, k_scales is not None, q.shape[0], block_q=block_q,
                            pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages,
                            row_gather=row_gather)
    return _prefill_triton(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales,
                           v_scales, scale=scale, blocks=blocks, interpret=interpret, poison=poison)


def check_ragged_inputs(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales, v_scales):
    kv_heads, _, page_size, head_dim = page_geometry(k_pages, v_pages, k_scales, v_scales)
    if q.ndim != 3:
        raise ValueError(f"q must be [T, N, H]; got shape {q.shape}")
    _, n, h = q.shape
    if h != head_dim:
        raise ValueError(f"q head_dim {h} must equal the pages' head_dim {head_dim}")
    if n % kv_heads:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv_heads} (G = N / K)")
    if page_table.ndim != 2 or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [B, max_pages]; got {page_table.dtype} {page_table.shape}")
    b = page_table.shape[0]
    if context_lens.shape != (b,) or context_lens.dtype != jnp.int32:
        raise ValueError(f"context_lens must be int32 [B] = ({b},); got {context_lens.dtype} {context_lens.shape}")
    if query_start.shape != (b + 1,) or query_start.dtype != jnp.int32:
        raise ValueError(f"query_start must be int32 [B+1] = ({b + 1},); got {query_start.dtype} {query_start.shape}")
    if jnp.size(num_seqs) != 1:
        raise ValueError(f"num_seqs must be a scalar or [1]; got shape {jnp.shape(num_seqs)}")
    if page_size & (page_size - 1) or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"page size L={page_size} and head_dim H={head_dim} must be powers of two (H >= 16)")


def validate_ragged(q, page_table, context_lens, query_start, num_seqs, *, num_pages, page_size) -> None:
    """Host-side checks on concrete ragged metadata (raises ValueError)."""
    import numpy as np
    qs = np.asarray(query_start)
    ns = int(np.asarray(num_seqs).reshape(-1)[0])
    ctx = np.asarray(context_lens)
    if not 0 <= ns <= page_table.shape[0]:
        raise ValueError(f"num_seqs={ns} must be in 0..{page_table.shape[0]}")
    if qs[0] < 0 or np.any(np.diff(qs[: ns + 1]) < 0) or qs[ns] > q.shape[0]:
        raise ValueError(f"query_start[:num_seqs+1]={qs[: ns + 1].tolist()} must be non-decreasing within 0..T={q.shape[0]}")
    q_lens = np.diff(qs[: ns + 1])
    if np.any(q_lens > ctx[:ns]):
        b = int(np.nonzero(q_lens > ctx[:ns])[0][0])
        raise ValueError(f"sequence {b} has {q_lens[b]} query tokens but context_lens={ctx[b]} (the chunk's "
                         f"tokens must already be in the cache)")
    validate_page_table(page_table, context_lens, num_pages=num_pages, page_size=page_size, num_seqs=ns)


def ragged_paged_attention(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, *, k_scales=None,
                           v_scales=None, scale=None, block_q=None, pages_per_block=None, num_warps=None,
                           num_stages=None, row_gather=None, backend=None, interpret=False, _poison=False):
    """Chunked-prefill attention over a paged KV cache.

    q [T, N, H] packed query tokens; page_table [B, max_pages] int32; context_lens [B] int32 (cached
    tokens of seq b after this chunk was written); query_start [B+1] int32 (seq b's queries are
    q[query_start[b]:query_start[b+1]], the last tokens of its context, causal within the chunk);
    num_seqs: scalar or [1] int32, rows of B in use. int8 pages take k_scales, v_scales [K, P, L].
    Returns [T, N, H]; rows past query_start[num_seqs] are zeros. backend/block sizes as in
    ``paged_attention``, plus ``backend="mosaic_gpu"``: the Hopper kernel of ``ragged_paged_attention_mgpu``
    (bfloat16 / float16 pages, head_dim a multiple of 64, finite values in unowned page slots; block_q 128 or 256
    tokens a program, pages_per_block and num_stages its key blocks), the default on a Hopper GPU where the inputs
    fit it and no Triton-only option (num_warps, row_gather, another block_q) is given.
    """
    check_ragged_inputs(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales, v_scales)
    if _is_concrete(page_table, context_lens, query_start, num_seqs):
        validate_ragged(q, page_table, context_lens, query_start, num_seqs, num_pages=k_pages.shape[1],
                        page_size=k_pages.shape[2])
    if backend == "mosaic_gpu" or (backend is None and not interpret and num_warps is None and row_gather is None
                                   and on_hopper()):
        try:  # Hopper's default where the inputs fit it (prefill_mgpu_h100.json: 1.37x the Triton kernel)
            from .ragged_paged_attention_mgpu import pages_per_block_for
            pages_per_block = pages_per_block_for(q, k_pages, page_table, k_scales, block_q, pages_per_block,
                                                  num_stages)
            backend = "mosaic_gpu"
        except ValueError:
            if backend == "mosaic_gpu":
                raise
    if backend != "mosaic_gpu":
        backend = _select_backend(backend, interpret)
    return _ragged_paged_attention(
        q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, k_scales, v_scales, scale=scale,
        block_q=block_q, pages_per_block=pages_per_block, num_warps=num_warps, num_stages=num_stages,
        row_gather=row_gather, backend=backend, interpret=interpret, poison=_poison)
