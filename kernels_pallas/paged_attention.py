"""Paged decode attention: one query token per sequence over a paged KV cache (flash-decoding).

Public: ``paged_attention`` (dispatch), ``paged_attention_reference`` (plain jnp, the truth). The Mosaic TPU
kernel lives in ``paged_attention_tpu.py``; this module holds the GPU kernel, the checks and the dispatch.

Hopper, opt-in: ``backend="mosaic_gpu"`` runs ``paged_attention_mgpu.py`` (TMA page copies, wgmma over the G query
heads of a KV head, a loader warpgroup; bfloat16 / float16 pages, G a multiple of 8): correct on the H100 but slower
than this kernel at every summary point in session 20 (``experiments/tune_decode_mgpu.py``), so not the default.

GPU kernel (Pallas, Triton lowering; grid (B, K, S)): program (b, k, s) owns sequence b, kv head k and
the s-th split of b's pages. It loads the G query heads of kv head k once ([G, H], G padded to 16 rows
for the tensor cores), then streams ``pages_per_block`` pages at a time: the page ids are gathered
from the page table, K and V pages of head k are loaded once and used by all G query heads
(logits [G, pages_per_block * L]); with ``row_gather`` (the H100 table's choice) the pool is viewed as
[P * L, H] rows and the block's keys are loaded as one 2-D gather of their rows (``pool_rows``), instead of
[pages, L, H] page tiles whose reshape Triton routes through shared memory; with an online softmax in float32. With one split the kernel
writes the normalized output; with several, each split writes its normalized partial output
[G, H] and log-sum-exp [G] (base 2) and a small combine kernel merges them:
out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s. Empty splits carry lse = -1e30
and weigh nothing. int8 pages are dequantized in the kernel: K scales multiply the logits per key,
V scales multiply the probabilities per key (both per token per head), so no dequantized copy exists.
With ``int8_qk`` (int8 pages only) q is written once per program as two int8 digits per element (the
``xla_split`` fixed point of ``quantized_matmul.split_digits``: 15 bits per query row, ``q ~ (128 hi + lo) step``)
and q.K^T runs as two int8 x int8 -> int32 tensor-core dots straight from the int8 K tile, instead of
converting every key to bf16 first. P.V stays a bf16 product (int8 dots on the int8 V tile, contracted over its
rows, measured 2x slower on the H100; a float16 P.V needs the V scales rescaled per block to stay in range and
measured 7% slower with it: ``experiments/results/paged_attention_h100_notes.md``). Per logit the int8 path
sums the two digit dots in int32 (one conversion), then takes one multiply by the key's factor (K scale, times
the softmax scale without int8_qk), one by the row's (int8_qk: the digit step times the softmax scale) and adds
the key's mask bias (0, or -1e30 past the length); exponents are one ``ex2.approx.ftz`` each (``fast_exp2``).
An Nsight Compute profile on the H200 (session 29, ``experiments/results/paged_variants/s29/``) shows what is
left: Triton reads the int8 V tile from shared memory a byte at a time in the dot's operand layout (LDS.U8 11%
of the executed instructions, PRMT 14%); converting V to bf16 in PTX where it is loaded changed nothing
(Triton still converts in the dot's layout), so that is not in the code. The kernel's experimental block option
``v_keys_minor`` (int8 pages, one page a block; not reachable from ``paged_attention``) takes V pages stored
[K, P, H, L], keys contiguous, where the dot's k-pairs are adjacent bytes: ``experiments/diag_int8_vt_decode.py``
measures it against this layout before the cache would change for it (written in session 29, not yet run on a GPU).

Keys past a sequence's length never leak, whatever stale or non-finite values their slots hold: their logits
are masked; bf16 / f16 / f32 V rows past the length load as zeros (a masked load; a select over the whole
tile before) and int8 V, finite by construction, meets probabilities times V scales zeroed past the length.
Page-table entries past the last used page are replaced by page 0 and entries are clamped into the pool, so
no launch reads outside the pool.

Block sizes (keyword-only, static): pages_per_block, num_splits, num_warps, num_stages, prefetch_ids,
row_gather; when None
they come from kernels_pallas/tuned/paged_attention.json (written by experiments/tune_paged_attention.py).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .kv_pages import _is_concrete, page_geometry, validate_page_table
from .quantized_matmul import SPLIT_STEPS
from .tuned_device import rows_for

MASK_VALUE = -1e30  # finite: fully masked rows stay NaN-free
LOG2E = 1.4426950408889634
BACKENDS = ("triton", "mosaic_tpu", "mosaic_gpu", "reference")
_TUNED_PATH = Path(__file__).with_name("tuned") / "paged_attention.json"


# ----------------------------------------------------------------------------------------- reference
def paged_attention_reference(q, k_pages, v_pages, lengths, page_table, *, k_scales=None, v_scales=None,
                              scale=None):
    """Decode attention in plain jnp (float32 math). q [B, N, H] -> [B, N, H] in q's dtype."""
    b, n, h = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    scale = h ** -0.5 if scale is None else scale
    k = gather_pages(k_pages, page_table, k_scales)  # [B, S, K, H] float32
    v = gather_pages(v_pages, page_table, v_scales)
    valid = jnp.arange(k.shape[1])[None, :] < lengths[:, None]  # [B, S]
    k = jnp.where(valid[:, :, None, None], k, 0.0)
    v = jnp.where(valid[:, :, None, None], v, 0.0)
    qg = q.astype(jnp.float32).reshape(b, kv_heads, n // kv_heads, h)  # [B, K, G, H]
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k, precision="highest") * scale
    logits = jnp.where(valid[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v, precision="highest")
    out = jnp.where((lengths > 0)[:, None, None, None], out, 0.0)
    return out.reshape(b, n, h).astype(q.dtype)


def gather_pages(pages, page_table, scales=None):
    """[K, P, L, H] pages (+ [K, P, L] scales) and [B, max_pages] table -> [B, max_pages * L, K, H] f32."""
    kv_heads, num_pages, page_size, h = pages.shape
    pt = jnp.clip(page_table, 0, num_pages - 1)
    x = pages[:, pt].astype(jnp.float32)  # [K, B, max_pages, L, H]
    if scales is not None:
        x = x * scales[:, pt][..., None]
    b, mp = page_table.shape
    return jnp.transpose(x.reshape(kv_heads, b, mp * page_size, h), (1, 2, 0, 3))


def pool_rows(pt_ref, b, pstart, *, pages_per_block, page_size, n_pages, max_pages, num_pages):
    """Row gather (GPU kernels): the pool rows ``page id * L + slot`` of the ``pages_per_block * L`` keys from
    page ``pstart`` of sequence b, for pools viewed as ``[P * L, H]``; keys of pages at or past n_pages read
    page 0 (masked by the caller). Loading these rows as one 2-D tile avoids the shared-memory round trip of
    reshaping gathered ``[pages, L, H]`` page tiles."""
    r = jnp.arange(pages_per_block * page_size)
    slot = pstart + r // page_size
    ids = pt_ref[b, jnp.minimum(slot, max_pages - 1)]
    return jnp.clip(jnp.where(slot < n_pages, ids, 0), 0, num_pages - 1) * page_size + r % page_size


def pool_operands(k_pages, v_pages, k_scales, v_scales, row_gather):
    """(pools, BlockSpecs) for a kernel whose grid axis 1 is the kv head: page tiles [P, L, H] of head k, or
    with row_gather the rows [P * L, H] (a free reshape: a page's L rows are contiguous); int8 scales alike."""
    kv_heads, num_pages, page_size, head_dim = k_pages.shape
    pools = [k_pages, v_pages] + ([k_scales, v_scales] if k_scales is not None else [])
    if row_gather:
        pools = [x.reshape(kv_heads, num_pages * page_size, *x.shape[3:]) for x in pools]
    specs = [pl.BlockSpec((None, *x.shape[1:]), lambda _, k, *__, nd=x.ndim: (k,) + (0,) * (nd - 1))
             for x in pools]
    return pools, specs


# ----------------------------------------------------------------------------------------- tuning
@functools.lru_cache(maxsize=1)
def _tuned_table() -> dict:
    try:
        return json.loads(_TUNED_PATH.read_text())
    except FileNotFoundError:
        return {}


def device_kind() -> str:
    return jax.devices()[0].device_kind


def tuned_blocks(op: str, **key) -> tuple[dict, dict]:
    """Nearest tuned entry for ``op`` on this device (else on a sibling chip, ``tuned_device``): same quantized /
    group, nearest batch and context (log scale), same page size preferred. Returns (entry key, blocks), or
    ({}, {}) when the table has nothing."""
    rows = [(dev, e) for dev, entries in _tuned_table().get(op, {}).items() for e in entries
            if all(e["key"].get(f) == key.get(f) for f in ("quantized", "group"))]
    cands = [e for _, e in rows_for(rows, device_kind(), device=lambda row: row[0])]  # else a sibling chip's
    if not cands:
        return {}, {}
    dist = lambda e: 0.5 * (e["key"].get("page_size") != key.get("page_size")) + sum(
        abs(math.log2(max(e["key"][f], 1)) - math.log2(max(key[f], 1)))
        for f in ("batch", "context") if f in key and f in e["key"])
    best = min(cands, key=dist)
    return dict(best["key"]), dict(best["blocks"])


def fast_exp2(x, interpret: bool):
    """2**x in float32 as one ``ex2.approx.ftz.f32`` (MUFU) on the GPU; jnp.exp2 lowers to libdevice's
    non-flush-to-zero exp2f, which adds denormal handling around it. Interpret mode: jnp.exp2."""
    if interpret:
        return jnp.exp2(x)
    return pltriton.elementwise_inline_asm("ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                           result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# ----------------------------------------------------------------------------------------- GPU kernel
def _decode_kernel(len_ref, pt_ref, q_ref, k_ref, v_ref, *refs, group, group_pad, page_size,
                   pages_per_block, pages_per_split, num_pages, max_pages, scale, quantized, direct,
                   prefetch_ids, row_gather, int8_qk=False, interpret=False, v_keys_minor=False):
    # len_ref [B]; pt_ref [B, max_pages]; q_ref [B, N, H]; k_ref, v_ref [P, L, H] (head k), scales [P, L];
    # row_gather: k_ref, v_ref [P * L, H], scales [P * L] (one pool row per key, gathered as a 2-D tile);
    # v_keys_minor (experimental, int8, one page a block, no row gather): v_ref [P, H, L], keys contiguous.
    # Outputs: direct -> o_ref [B, N, H], else o_ref [G_pad, H] f32, lse_ref [G_pad].
    if quantized:
        ks_ref, vs_ref, *outs = refs
    else:
        outs = refs
    b, kh, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[-1]
    block = pages_per_block * page_size
    length = len_ref[b]
    n_pages = jnp.minimum((length + page_size - 1) // page_size, max_pages)
    p0 = s * pages_per_split
    p1 = jnp.minimum(p0 + pages_per_split, n_pages)
    n_iter = (jnp.maximum(p1 - p0, 0) + pages_per_block - 1) // pages_per_block

    row_ok = jnp.broadcast_to((jnp.arange(group_pad) < group)[:, None], (group_pad, head_dim))
    q_at = q_ref.at[b, pl.ds(kh * group, group_pad), :]
    q = pltriton.load(q_at, mask=row_ok, other=0) if group_pad != group else q_ref[b, pl.ds(kh * group, group), :]
    cdt = q.dtype
    c = scale * LOG2E  # logits in log2 units: m, the row max, is kept in them
    if int8_qk:  # q [G_pad, H] -> int8 digits hi, lo and a step per row: q ~ (128 hi + lo) * step
        qf = q.astype(jnp.float32)
        q_step = jnp.maximum(jnp.max(jnp.abs(qf), axis=1), 1e-30) / SPLIT_STEPS  # [G_pad]
        row_scale = (q_step * c)[:, None]  # [G_pad, 1]: the logits' factor per query row
        xs = jnp.floor(qf / q_step[:, None] + 0.5)  # |xs| <= 16256
        q_hi = jnp.floor(xs * (1.0 / 128.0) + 0.5)
        q_lo = (xs - 128.0 * q_hi).astype(jnp.int32).astype(jnp.int8)
        q_hi = q_hi.astype(jnp.int32).astype(jnp.int8)

    def page_ids(pstart):  # [ppb] page ids, or with row_gather [block] pool rows (page id * L + slot)
        if row_gather:
            return pool_rows(pt_ref, b, pstart, pages_per_block=pages_per_block, page_size=page_size,
                             n_pages=n_pages, max_pages=max_pages, num_pages=num_pages)
        page_ok = pstart + jnp.arange(pages_per_block) < n_pages
        ids = pltriton.load(pt_ref.at[b, pl.ds(pstart, pages_per_block)], mask=page_ok, other=0)
        return jnp.clip(jnp.where(page_ok, ids, 0), 0, num_pages - 1)

    def gather(ref, ids, scales=False):  # -> [block, H] keys / values, or [1, block] scales
        return ref[ids].reshape((1, block) if scales else (block, head_dim))

    def gather_valid(ref, ids, valid):  # [block, H] values, rows of keys past the length loaded as zeros
        if interpret:  # the interpreter's masked load takes no gather; the GPU tests run the masked load
            return jnp.where(valid[:, None], gather(ref, ids), jnp.zeros((), ref.dtype))
        shape = (block, head_dim) if row_gather else (pages_per_block, page_size, head_dim)
        mask = jnp.broadcast_to(valid.reshape(shape[:-1])[..., None], shape)
        return pltriton.load(ref.at[ids], mask=mask, other=0).reshape(block, head_dim)

    def body(i, carry):
        acc, m, l, ids = carry
        pstart = p0 + i * pages_per_block
        ids_next = page_ids(pstart + pages_per_block) if prefetch_ids else None  # issued before this block's loads
        if not prefetch_ids:
            ids = page_ids(pstart)
        valid = pstart * page_size + jnp.arange(block) < length
        k = gather(k_ref, ids)
        if quantized:  # int8 K and V are finite whatever a slot holds: no per-element masks, per-key ones only
            v = v_ref[ids].reshape(head_dim, block) if v_keys_minor else gather(v_ref, ids)
            v = v.astype(cdt)
            k_scale = jnp.where(valid[None, :], gather(ks_ref, ids, scales=True), 0.0) * (1.0 if int8_qk else c)
            bias = jnp.where(valid[None, :], 0.0, MASK_VALUE)
        else:  # stale slots past the length may hold anything: those rows of V load as zeros
            v = gather_valid(v_ref, ids, valid).astype(cdt)
        if int8_qk:  # 128 hi + lo summed in int32 (|.| < 2^28), one conversion a logit
            dims = (((1,), (1,)), ((), ()))
            hi = lax.dot_general(q_hi, k, dims, preferred_element_type=jnp.int32)
            lo = lax.dot_general(q_lo, k, dims, preferred_element_type=jnp.int32)
            logits = (hi * 128 + lo).astype(jnp.float32)
        else:
            logits = lax.dot_general(q, k.astype(cdt), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        if quantized:  # [1, block] key factors (K scale, c), [G_pad, 1] row factors (int8_qk), masked keys' bias
            logits = (logits * k_scale * row_scale if int8_qk else logits * k_scale) + bias
        else:
            logits = jnp.where(valid[None, :], logits, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1) * (1.0 if quantized else c))
        alpha = fast_exp2(m - m_new, interpret)
        p = fast_exp2((logits if quantized else logits * c) - m_new[:, None], interpret)
        l = l * alpha + jnp.sum(p, axis=1)
        if quantized:
            p = p * jnp.where(valid[None, :], gather(vs_ref, ids, scales=True), 0.0)
        pv_dims = (((1,), (1 if v_keys_minor else 0,)), ((), ()))  # keys-minor V [H, block]: contract its keys
        acc = acc * alpha[:, None] + lax.dot_general(p.astype(cdt), v, pv_dims, preferred_element_type=jnp.float32)
        return acc, m_new, l, (ids_next if prefetch_ids else ids)

    init = (jnp.zeros((group_pad, head_dim), jnp.float32), jnp.full((group_pad,), MASK_VALUE, jnp.float32),
            jnp.zeros((group_pad,), jnp.float32), page_ids(p0))
    acc, m, l, _ = lax.fori_loop(0, n_iter, body, init)
    nonempty = l > 0
    out = acc / jnp.where(nonempty, l, 1.0)[:, None]
    if direct:
        (o_ref,) = outs
        o_at = o_ref.at[b, pl.ds(kh * group, group_pad), :]
        if group_pad != group:
            pltriton.store(o_at, out.astype(o_ref.dtype), mask=row_ok)
        else:
            o_ref[b, pl.ds(kh * group, group), :] = out.astype(o_ref.dtype)
    else:
        o_ref, lse_ref = outs
        o_ref[...] = out
        lse_ref[...] = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), MASK_VALUE)


def _combine_kernel(o_part_ref, lse_ref, o_ref, *, group, num_splits, chunk):
    # Grid (B, K, G): one query head per program, splits merged `chunk` at a time.
    # o_part_ref [B, K, S, G_pad, H] f32; lse_ref [B, K, S, G_pad] (base 2); o_ref [B, N, H].
    b, kh, g = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = o_ref.shape[-1]

    def body(c, carry):
        acc, m, d = carry
        ok = c * chunk + jnp.arange(chunk) < num_splits
        lse = pltriton.load(lse_ref.at[b, kh, pl.ds(c * chunk, chunk), g], mask=ok, other=MASK_VALUE)
        o = pltriton.load(o_part_ref.at[b, kh, pl.ds(c * chunk, chunk), g, :],
                          mask=jnp.broadcast_to(ok[:, None], (chunk, head_dim)), other=0.0)
        m_new = jnp.maximum(m, jnp.max(lse))
        alpha, w = jnp.exp2(m - m_new), jnp.exp2(lse - m_new)
        return acc * alpha + jnp.sum(w[:, None] * o, axis=0), m_new, d * alpha + jnp.sum(w)

    init = (jnp.zeros((head_dim,), jnp.float32), jnp.float32(MASK_VALUE), jnp.float32(0.0))
    acc, _, d = lax.fori_loop(0, (num_splits + chunk - 1) // chunk, body, init)
    o_ref[b, kh * group + g, :] = (acc / d).astype(o_ref.dtype)


def decode_blocks(batch, kv_heads, group, max_pages, page_size, quantized, **given) -> dict:
    """Fills unset block sizes: tuned table first, then a default; clamps to what the shapes allow."""
    blocks = {k: v for k, v in given.items() if v is not None}
    if len(blocks) < 7:
        key, tuned = tuned_blocks("decode", page_size=page_size, quantized=quantized, group=group, batch=batch,
                                  context=max_pages * page_size)
        if tuned:  # carry the tuned point over as (programs in flight, tokens per block), not raw counts
            programs = key["batch"] * kv_heads * tuned["num_splits"]
            tuned["num_splits"] = max(1, round(programs / (batch * kv_heads)))
            tuned["pages_per_block"] = max(1, tuned["pages_per_block"] * key["page_size"] // page_size)
        default = dict(pages_per_block=max(1, 64 // page_size), num_splits=max(1, round(128 / (batch * kv_heads))),
                       num_warps=4, num_stages=3, prefetch_ids=True, row_gather=False, int8_qk=False)
        blocks = {**default, **tuned, **blocks}
    ppb = blocks["pages_per_block"]
    if ppb < 1 or ppb & (ppb - 1):
        raise ValueError(f"pages_per_block must be a power of two >= 1; got {ppb}")
    ppb = min(ppb, _pow2(max_pages))
    splits = max(1, min(int(blocks["num_splits"]), -(-max_pages // ppb)))
    pages_per_split = -(-(-(-max_pages // splits)) // ppb) * ppb
    return dict(pages_per_block=ppb, pages_per_split=pages_per_split,
                num_splits=-(-max_pages // pages_per_split),
                num_warps=int(blocks["num_warps"]), num_stages=int(blocks["num_stages"]),
                prefetch_ids=bool(blocks.get("prefetch_ids", True)),
                row_gather=bool(blocks.get("row_gather", False)),
                int8_qk=bool(blocks.get("int8_qk", False)) and quantized)


def _decode_triton(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, *, scale, blocks,
                   interpret, poison):
    batch, n, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    group = n // kv_heads
    group_pad = max(16, _pow2(group))
    splits, pps = blocks["num_splits"], blocks["pages_per_split"]
    quantized = k_scales is not None
    direct = splits == 1
    if blocks.get("v_keys_minor") and (blocks["pages_per_block"] != 1 or blocks["row_gather"] or not quantized):
        raise ValueError(f"v_keys_minor (V pages [K, P, H, L]) takes int8 pages, pages_per_block 1 and no "
                         f"row_gather; got {k_pages.dtype} pages, {blocks}")
    kernel = functools.partial(
        _decode_kernel, group=group, group_pad=group_pad, page_size=page_size,
        pages_per_block=blocks["pages_per_block"], pages_per_split=pps, num_pages=num_pages,
        max_pages=page_table.shape[1], scale=scale, quantized=quantized, direct=direct,
        prefetch_ids=blocks["prefetch_ids"], row_gather=blocks["row_gather"],
        int8_qk=blocks["int8_qk"], interpret=interpret, v_keys_minor=blocks.get("v_keys_minor", False))
    whole = pl.BlockSpec()
    pools, pool_specs = pool_operands(k_pages, v_pages, k_scales, v_scales, blocks["row_gather"])
    in_specs = [whole, whole, whole] + pool_specs
    args = [lengths, page_table, q] + pools
    params = pltriton.CompilerParams(num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])
    if direct:
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
        out_specs = [whole]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, kv_heads, splits, group_pad, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((batch, kv_heads, splits, group_pad), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, None, group_pad, head_dim), lambda b, k, s: (b, k, s, 0, 0)),
                     pl.BlockSpec((None, None, None, group_pad), lambda b, k, s: (b, k, s, 0))]
    aliases = {}
    if poison:  # tests: every output element starts as NaN and must be overwritten
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape]
        in_specs += out_specs
        aliases = {len(args) - len(out_shape) + i: i for i in range(len(out_shape))}
        kernel = _drop_aliased_inputs(kernel, len(out_shape))
    tag = ("_i8qk" if blocks["int8_qk"] else "") + ("_vkm" if blocks.get("v_keys_minor") else "")
    outs = pl.pallas_call(
        kernel, grid=(batch, kv_heads, splits), in_specs=in_specs, out_specs=out_specs,
        out_shape=out_shape, input_output_aliases=aliases, compiler_params=params, interpret=interpret,
        name=f"paged_decode_g{group}_l{page_size}_ppb{blocks['pages_per_block']}_s{splits}{tag}",
    )(*args)
    if direct:
        return outs[0]
    o_part, lse = outs
    combine_args, combine_specs, combine_alias = [o_part, lse], [whole, whole], {}
    combine = functools.partial(_combine_kernel, group=group, num_splits=splits, chunk=min(32, _pow2(splits)))
    if poison:
        combine_args.append(jnp.full(q.shape, jnp.nan, q.dtype))
        combine_specs.append(whole)
        combine_alias = {2: 0}
        combine = _drop_aliased_inputs(combine, 1)
    return pl.pallas_call(
        combine, grid=(batch, kv_heads, group), in_specs=combine_specs, out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), input_output_aliases=combine_alias,
        compiler_params=pltriton.CompilerParams(num_warps=2, num_stages=2), interpret=interpret,
        name=f"paged_decode_combine_s{splits}",
    )(*combine_args)


def _drop_aliased_inputs(kernel, n_out, n_scratch=0):
    """The aliased (poisoned) input refs are the same buffers as the outputs: hide them from the kernel."""
    def wrapped(*refs):
        end = len(refs) - n_scratch
        return kernel(*refs[: end - 2 * n_out], *refs[end - n_out:])
    return wrapped


# ----------------------------------------------------------------------------------------- dispatch
def check_decode_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales):
    """Static (shape/dtype) checks; raises ValueError before any launch. Returns (K, P, L, H)."""
    kv_heads, num_pages, page_size, head_dim = page_geometry(k_pages, v_pages, k_scales, v_scales)
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, H]; got shape {q.shape}")
    batch, n, h = q.shape
    if h != head_dim:
        raise ValueError(f"q head_dim {h} must equal the pages' head_dim {head_dim}")
    if n % kv_heads:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={kv_heads} (G = N / K)")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q must be floating point; got {q.dtype}")
    if lengths.shape != (batch,) or lengths.dtype != jnp.int32:
        raise ValueError(f"lengths must be int32 [B] = ({batch},); got {lengths.dtype} {lengths.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != batch or page_table.dtype != jnp.int32:
        raise ValueError(f"page_table must be int32 [B={batch}, max_pages]; got {page_table.dtype} {page_table.shape}")
    if page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page size L={page_size} must be a power of two (16..256 are supported)")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim H={head_dim} must be a power of two >= 16")
    return kv_heads, num_pages, page_size, head_dim


def _select_backend(backend, interpret):
    if backend is None:
        platform = jax.default_backend()
        backend = {"gpu": "triton", "tpu": "mosaic_tpu"}.get(platform, "triton" if interpret else "reference")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    return backend


@functools.partial(jax.jit, static_argnames=("scale", "pages_per_block", "num_splits", "num_warps",
                                             "num_stages", "prefetch_ids", "row_gather", "int8_qk", "backend",
                                             "interpret", "poison"))
def _paged_attention(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, *, scale, pages_per_block,
                     num_splits, num_warps, num_stages, prefetch_ids, row_gather, int8_qk, backend, interpret,
                     poison):
    kv_heads, _, page_size, head_dim = k_pages.shape
    scale = head_dim ** -0.5 if scale is None else float(scale)
    if backend == "reference":
        return paged_attention_reference(q, k_pages, v_pages, lengths, page_table, k_scales=k_scales,
                                         v_scales=v_scales, scale=scale)
    if backend == "mosaic_gpu":
        from .paged_attention_mgpu import paged_decode_mgpu
        return paged_decode_mgpu(q, k_pages, v_pages, lengths, page_table, scale=scale,
                                 pages_per_block=pages_per_block, num_splits=num_splits, stages=num_stages or 2,
                                 interpret=interpret)
    if backend == "mosaic_tpu":
        from .paged_attention_tpu import decode_tpu
        return decode_tpu(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, scale=scale,
                           interpret=interpret, poison=poison)
    blocks = decode_blocks(q.shape[0], kv_heads, q.shape[1] // kv_heads, page_table.shape[1], page_size,
                           k_scales is not None, pages_per_block=pages_per_block, num_splits=num_splits,
                           num_warps=num_warps, num_stages=num_stages, prefetch_ids=prefetch_ids,
                           row_gather=row_gather, int8_qk=int8_qk)
    return _decode_triton(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, scale=scale,
                          blocks=blocks, interpret=interpret, poison=poison)


def paged_attention(q, k_pages, v_pages, lengths, page_table, *, k_scales=None, v_scales=None, scale=None,
                    pages_per_block=None, num_splits=None, num_warps=None, num_stages=None, prefetch_ids=None,
                    row_gather=None, int8_qk=None, backend=None, interpret=False, _poison=False):
    """Decode attention over a paged KV cache.

    q [B, N, H]; k_pages, v_pages [K, P, L, H] (bf16/f16/f32, or int8 with k_scales, v_scales [K, P, L]
    float32); lengths [B] int32 (keys 0..lengths[b]-1, the new token's k/v already written);
    page_table [B, max_pages] int32. Returns [B, N, H] in q's dtype; query head n uses kv head n // G.
    A sequence of length 0 gets zeros. ``scale`` defaults to H**-0.5.

    backend: None picks the Pallas GPU kernel on GPU (and under ``interpret=True`` on CPU), the Mosaic
    TPU kernel on TPU, and the jnp reference elsewhere; "triton", "mosaic_tpu" or "reference" force one;
    "mosaic_gpu" runs the Hopper kernel of ``paged_attention_mgpu`` (opt-in; its ``check_inputs`` says what it
    takes; num_stages its key blocks in flight, finite values needed in unowned page slots).
    Block sizes (pages_per_block, num_splits, num_warps, num_stages, prefetch_ids: load the next block's
    page ids one iteration ahead; row_gather: load K/V as one 2-D [pages_per_block * L, H] gather of pool rows
    instead of [pages_per_block, L, H] pages reshaped; int8_qk, int8 pages only: q.K^T as int8 tensor-core dots
    of q's two int8 digits, module docstring) default to the tuned table; the TPU kernel takes one page per step.
    Shapes are checked before launch; concrete page tables and lengths are also checked on the host
    (``validate_page_table``).
    """
    check_decode_inputs(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales)
    if _is_concrete(lengths, page_table):
        validate_page_table(page_table, lengths, num_pages=k_pages.shape[1], page_size=k_pages.shape[2])
    if backend == "mosaic_gpu":
        from .paged_attention_mgpu import check_inputs
        pages_per_block = check_inputs(q, k_pages, page_table, k_scales, pages_per_block, num_splits, num_stages)
    return _paged_attention(q, k_pages, v_pages, lengths, page_table, k_scales, v_scales, scale=scale,
                            pages_per_block=pages_per_block, num_splits=num_splits, num_warps=num_warps,
                            num_stages=num_stages, prefetch_ids=prefetch_ids, row_gather=row_gather,
                            int8_qk=int8_qk, backend=_select_backend(backend, interpret),
                            interpret=interpret, poison=_poison)
