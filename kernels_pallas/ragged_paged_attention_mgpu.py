"""Ragged (chunked-prefill) paged attention as a Mosaic GPU kernel for Hopper: TMA page copies, wgmma, warp
specialization.

Public: ``ragged_paged_attention_mgpu`` (the kernel) and the dispatch's glue: ``prefill`` (block metadata, the call),
``pages_per_block_for`` and ``check_inputs`` (what the kernel takes), run by ``ragged_paged_attention`` with
``backend="mosaic_gpu"`` or on Hopper by default; the truth is ``ragged_paged_attention_reference`` in
``ragged_paged_attention.py``.

Status: checked on an H100 (jax 0.11.2, ``pytest -m gpu``), in Mosaic GPU interpret mode on the CPU, and lowered for
CUDA on the CPU (``jax.export``). The dispatch picks it on Hopper where the inputs fit it: 0.53 of the bf16 matmul
peak at 512-token chunks, context 4096, against the Triton kernel's 0.39 in the same run
(``experiments/results/paged_variants/s19/prefill_mgpu_h100.json``).

In interpret mode, four hardware idioms are replaced by their ``jnp`` values, because the interpreter lacks them:
``layout_cast``, ``transpose_ref``, register operands of ``wgmma``, and ``set_max_registers``. So the two matmuls
and the register layouts are checked only on the GPU (``pytest -m gpu``). Everything else is checked on the CPU:
the block bookkeeping, the page copies, the barriers between warpgroups, the causal mask and the online softmax.

Layout (shape letters as in the package: T query tokens, N query heads, K kv heads, G = N / K, H head_dim,
P pages, L page size):

* XLA cuts the packed tokens into blocks of at most ``BQ - 8`` tokens (BQ = 128 or 256) that never straddle two
  sequences (``ragged_paged_attention._block_map``), and writes per block a metadata row (position of the block's
  window, keys its last token sees, window start / 8, offset of the first token in the window, tokens) and the
  sequence's page-table row, both padded to 32 int32 words (a TMA copy moves a multiple of 128 bytes).
* The kernel reads each block's window, ``BQ`` rows of the packed ``[T, N, H]`` queries starting on a multiple of
  8 rows (a copy into tiled shared memory starts on a tile row; T itself is padded to a multiple of 8), and
  writes only the block's own tokens back into ``[T, N, H]``, from untiled shared memory, as a ladder of copies
  of 2^i rows (a copy's size is static). No gather or scatter runs outside the kernel.

Grid ``(N, blocks)``, three warpgroups a program (as in jax's FlashAttention-3 kernel, ``attention_mgpu``; the K/V
ring, the loader and the softmax step are ``mgpu_flash``'s, shared with the decode kernel):

* Warpgroups 0 and 1 each own BQ / 2 query rows of one head: ``wgmma`` of Q with K^T, online softmax in float32
  (log2 units), ``wgmma`` of P with V. The causal mask applies only on the key blocks that reach past the
  warpgroup's first row.
* Warpgroup 2 streams the blocks of ``block_kv`` keys: one TMA copy per page of K and of V into a ring of
  ``stages`` shared-memory slots. It waits until both compute warpgroups release a slot before it refills it.

Page-table entries past a sequence's last page are clipped into the pool by XLA; their keys lie past every row's
position and are masked. A masked key's weight is exactly zero, but it still multiplies its V row, so unowned page
slots must hold finite values; the engine's pool starts as zeros and only ever holds the model's K / V. The Triton
kernel zeroes those rows itself. int8 pages are not supported here; the Triton kernel takes them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import ragged_paged_attention as ragged
from .mgpu_flash import (MAX_PAGE_ROW, META, SMEM_BYTES, SMEM_SLACK, Ring, check_pages, flash_step, init_state,
                         interpret_params, normalized, page_row_width, ring_scratch, stream_pages, swizzled)

BLOCK_Q = (128, 256)  # query tokens a program: two compute warpgroups of 64 or 128 rows (wgmma's M: 64 a step)
ALIGN = 8  # a block's window of q rows starts on a multiple of this (the tiling of its shared-memory rows)


# key-block sizes the dispatch tries, in order, when none is given: the first whose kernel fits shared memory.
# prefill_mgpu_h100.json (session 19, H100): 128 keys 0.53 of the bf16 matmul peak at context 4096, 64 keys 0.45-0.46
KEY_BLOCKS = (128, 64)


def key_block_options(page_size: int, pages_per_block: int | None) -> list[int]:
    """Pages a key block may hold, best first: the given number, else ``KEY_BLOCKS``' worth (at least one page)."""
    return [pages_per_block] if pages_per_block else [max(1, keys // page_size) for keys in KEY_BLOCKS]


def smem_bytes(*, block_q: int, block_kv: int, stages: int, head_dim: int, itemsize: int, width: int) -> int:
    """Shared memory the kernel asks for: Q rows, O rows, ``stages`` K and V tiles, the loader's page row."""
    return (2 * block_q + 2 * stages * block_kv) * head_dim * itemsize + 4 * width + SMEM_SLACK


def _kernel(q_ref, kp_ref, vp_ref, meta_ref, pt_ref, o_ref, scoped, *, group, page_size, block_kv, stages, scale,
            interpret):
    wg_rows = scoped[0][0].shape[1]  # rows of each compute warpgroup (BQ / 2)
    # q_ref, o_ref [T, N, H] packed tokens; kp_ref, vp_ref [K, P, L, H]; meta_ref [blocks, META] (first token's
    # position, keys seen by the last token, first token's row in q, tokens in the block); pt_ref [blocks, rows,
    # META] page ids.
    (q_smem, o_smem, k_smem, v_smem, meta_smem, pt_smem), (meta_bar, pt_bar, q_bar, k_bar, v_bar), consumed = scoped
    ring = Ring(k_smem, v_smem, k_bar, v_bar, *consumed, stages)
    head, blk, wg = lax.axis_index("heads"), lax.axis_index("blocks"), lax.axis_index("wg")
    kv_head = lax.div(head, jnp.array(group, head.dtype))
    head_dim = q_ref.shape[-1]

    # every warpgroup copies the block's metadata for itself (no cross-warpgroup wait); the loader the page row too
    plgpu.copy_gmem_to_smem(meta_ref.at[blk], meta_smem.at[wg], meta_bar.at[wg])
    plgpu.barrier_wait(meta_bar.at[wg])
    # the block's window: BQ rows of q from row 8 * t8 (a copy into tiled shared memory starts on a tile row); its
    # tokens are window rows [off, off + n_rows); pos0 is the position of window row 0
    pos0, kv_end, t8, off, n_rows = (meta_smem[wg, i] for i in range(5))
    w0 = t8 * ALIGN

    def steps_to(limit):  # key blocks needed to cover keys [0, limit)
        limit = jnp.clip(limit, 0, kv_end)
        return lax.div(limit + (block_kv - 1), jnp.array(block_kv, jnp.int32))

    total_steps = steps_to(pos0 + 2 * wg_rows)  # what the last row of the block needs: the loader's count

    @pl.when(wg < 2)
    def _compute():
        if not interpret:
            plgpu.set_max_registers(232, action="increase")
        rows = q_smem.at[wg]
        row0 = pos0 + wg * wg_rows  # position of this warpgroup's first row
        steps = steps_to(row0 + wg_rows)
        full = jnp.minimum(lax.div(row0 + 1, jnp.array(block_kv, jnp.int32)), steps)  # blocks with no masked key
        # window rows outside the block's tokens belong to other blocks (or lie past T: the copy fills zeros); they
        # are computed and never stored
        q_at = q_ref.at[pl.ds(pl.multiple_of(w0 + wg * wg_rows, ALIGN), wg_rows), head]
        plgpu.copy_gmem_to_smem(q_at, rows, q_bar.at[wg])
        plgpu.barrier_wait(q_bar.at[wg])
        c = scale * math.log2(math.e)

        def body(step, state, masked):
            causal = (lambda iota: step * block_kv + iota(1) <= row0 + iota(0)) if masked else None
            return flash_step(ring, step, state, rows, c=c, keep=causal, interpret=interpret)

        state = lax.fori_loop(0, full, functools.partial(body, masked=False),
                              init_state(wg_rows, head_dim, interpret=interpret))
        state = lax.fori_loop(full, steps, functools.partial(body, masked=True), state)

        @pl.loop(steps, total_steps)  # release the slots the other warpgroup still needs, in step order: waiting
        def _release(step):             # for each load keeps two releases of one slot from completing its phase
            slot = ring.slot(step)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_arrive(ring.k_free.at[slot])
            plgpu.barrier_arrive(ring.v_free.at[slot])

        out = normalized(state)
        o_rows = o_smem.at[wg]
        o_rows[...] = out.astype(o_ref.dtype)
        plgpu.commit_smem()
        # store exactly this warpgroup's tokens: a ladder of copies of 2^i rows (a TMA copy's size is static)
        lo = jnp.maximum(off, wg * wg_rows)  # this warpgroup's window rows that are the block's tokens: [lo, hi)
        count = jnp.maximum(jnp.minimum(off + n_rows, (wg + 1) * wg_rows) - lo, 0)
        start = 0
        size = wg_rows
        while size >= 1:
            @pl.when(count & size != 0)
            def _store(start=start, size=size):
                plgpu.copy_smem_to_gmem(o_rows.at[pl.ds(lo - wg * wg_rows + start, size)],
                                        o_ref.at[pl.ds(w0 + lo + start, size), head])
            start = start + (count & size)
            size //= 2
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _load():
        if not interpret:
            plgpu.set_max_registers(40, action="decrease")
        plgpu.copy_gmem_to_smem(pt_ref.at[blk], pt_smem, pt_bar)
        plgpu.barrier_wait(pt_bar)
        stream_pages(ring, pt_smem, kp_ref, vp_ref, kv_head=kv_head, steps=total_steps, page_size=page_size)


def ragged_paged_attention_mgpu(q, k_pages, v_pages, meta, pages, *, block_q: int, scale: float, block_kv: int = 64,
                                stages: int = 2, interpret: bool = False):
    """q [T, N, H] packed tokens (T a multiple of 8), k_pages / v_pages [K, P, L, H], meta [blocks, META] int32
    (per block: position of its window's first row, keys its last token sees, window start / 8, first token's row
    in the window, tokens), pages [blocks, W] int32 page ids (W a multiple of META, covering every key block) ->
    [T, N, H], each block's tokens written (``prefill`` builds the metadata; shapes are checked there)."""
    (n_blocks, _), (_, n, head_dim), bq = meta.shape, q.shape, block_q
    kv_heads, _, page_size, _ = k_pages.shape
    ppb = block_kv // page_size
    rows = pages.shape[1] // META  # the page row as [rows, META]: a TMA copy moves at most 256 along a dimension
    dt = q.dtype

    def ragged_paged_prefill_mgpu(q_ref, kp_ref, vp_ref, meta_ref, pt_ref, o_ref):  # the name in profiles
        tiles, full, consumed = ring_scratch(stages=stages, block_kv=block_kv, head_dim=head_dim, dtype=dt, ppb=ppb,
                                             consumers=2)
        smem = (swizzled((2, bq // 2, head_dim), dt),
                plgpu.SMEM((2, bq // 2, head_dim), dt),  # output rows, untiled: stored from any row
                *tiles, plgpu.SMEM((3, META), jnp.int32), plgpu.SMEM((rows, META), jnp.int32))
        bars = (plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=2), *full)
        kernel = functools.partial(_kernel, group=n // kv_heads, page_size=page_size, block_kv=block_kv,
                                   stages=stages, scale=scale, interpret=interpret)
        pl.run_scoped(lambda *s: kernel(q_ref, kp_ref, vp_ref, meta_ref, pt_ref, o_ref, s), smem, bars, consumed,
                      collective_axes="wg")

    return plgpu.kernel(
        ragged_paged_prefill_mgpu, out_type=jax.ShapeDtypeStruct(q.shape, dt), grid=(n, n_blocks),
        grid_names=("heads", "blocks"), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k_pages, v_pages, meta, pages.reshape(n_blocks, rows, META))


# ----------------------------------------------------------------------------------------- the dispatch's glue
def prefill(q, k_pages, v_pages, page_table, context_lens, query_start, num_seqs, *, scale, block_q,
            pages_per_block, stages, interpret):
    """Each block's metadata and page row for the Mosaic GPU kernel (``ragged_paged_attention_mgpu``), which reads
    and writes the packed [T, N, H] tokens itself. Blocks of ``block_q`` tokens (default 128), key blocks of
    ``pages_per_block`` pages (``pages_per_block_for``), ``stages`` of them in flight (default 2)."""
    t_total = q.shape[0]
    num_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    bq = block_q or BLOCK_Q[0]
    span = bq - ALIGN  # tokens a block: its window of bq rows starts up to ALIGN - 1 rows before them
    n_blocks = -(-t_total // span) + page_table.shape[0]
    seq, t0, t1, pad = ragged._block_map(query_start, num_seqs, t_total, span, n_blocks).T
    q_end, ctx = query_start[seq + 1], context_lens[seq]
    kv_end = jnp.where(pad == 1, 0, jnp.minimum(ctx - q_end + t1, ctx))  # keys the block's last token sees
    t0 = jnp.minimum(t0, t_total)
    off = t0 % ALIGN
    words = jnp.zeros((n_blocks, META), jnp.int32).at[:, :5].set(jnp.stack(  # padding blocks store zeros
        [ctx - q_end + t0 - off, kv_end, t0 // ALIGN, off, jnp.maximum(t1 - t0, 0)], axis=1))
    ppb = pages_per_block
    width = page_row_width(page_table.shape[1], ppb)
    pages = jnp.zeros((n_blocks, width), jnp.int32).at[:, :page_table.shape[1]].set(
        jnp.clip(page_table[seq], 0, num_pages - 1))
    # the kernel's copies tile the token axis by 8 rows (no copy of q when T is a multiple of 8); the interpreter
    # rejects a copy that runs past T, where the GPU's TMA fills zeros: give it a block of rows more
    extra = bq if interpret else -t_total % ALIGN
    if extra:
        q = jnp.concatenate([q, jnp.zeros((extra,) + q.shape[1:], q.dtype)])
    out = ragged_paged_attention_mgpu(q, k_pages, v_pages, words, pages, block_q=bq, scale=scale,
                                      block_kv=ppb * page_size, stages=stages or 2, interpret=interpret)
    return out[:t_total]


def pages_per_block_for(q, k_pages, page_table, k_scales, block_q, pages_per_block, num_stages) -> int:
    """Pages a key block of the Mosaic GPU prefill kernel holds: the given number, else the first of
    ``KEY_BLOCKS``' worth whose kernel fits; the inputs checked (ValueError naming what the kernel does not take)."""
    options = key_block_options(k_pages.shape[2], pages_per_block)
    for i, ppb in enumerate(options):
        try:
            check_inputs(q, k_pages, page_table, k_scales, block_q, ppb, num_stages)
            return ppb
        except ValueError:
            if i == len(options) - 1:
                raise
    raise AssertionError("unreachable")


def check_inputs(q, k_pages, page_table, k_scales, block_q, ppb, num_stages) -> None:
    """What the Mosaic GPU prefill kernel takes, with key blocks of ``ppb`` pages (ValueError naming what not)."""
    page_size, head_dim = k_pages.shape[2], k_pages.shape[3]
    if block_q is not None and block_q not in BLOCK_Q:
        raise ValueError(f"backend='mosaic_gpu' takes block_q in {BLOCK_Q} (two warpgroups of 64 or 128 rows); got "
                         f"{block_q}")
    check_pages(q, k_pages, k_scales, ppb, num_stages)
    if page_row_width(page_table.shape[1], ppb) > MAX_PAGE_ROW:
        raise ValueError(f"backend='mosaic_gpu' takes at most {MAX_PAGE_ROW} pages a sequence (the page table's "
                         f"width); got {page_table.shape[1]}: use a larger page size or backend='triton'")
    need = smem_bytes(block_q=block_q or BLOCK_Q[0], block_kv=ppb * page_size, stages=num_stages or 2,
                      head_dim=head_dim, itemsize=q.dtype.itemsize, width=page_row_width(page_table.shape[1], ppb))
    if need > SMEM_BYTES:
        raise ValueError(f"backend='mosaic_gpu' with block_q={block_q or BLOCK_Q[0]}, {ppb * page_size}-key blocks, "
                         f"num_stages={num_stages or 2} and {page_table.shape[1]} pages a sequence needs {need} bytes "
                         f"of shared memory; a Hopper block has {SMEM_BYTES}: lower num_stages, pages_per_block or "
                         f"block_q")
