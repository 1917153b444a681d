"""Paged decode attention as a Mosaic GPU kernel for Hopper: TMA page copies, wgmma, a loader warpgroup.

Public: ``paged_decode_mgpu`` (run by ``paged_attention(..., backend="mosaic_gpu")``); the truth is
``paged_attention_reference`` in ``paged_attention.py``.

Status: correct on the H100 (session 20) but slower than the Triton kernel at each of issue 4's points
(experiments/results/paged_variants/s20/), so the dispatch runs it only when ``backend="mosaic_gpu"`` is passed.
CI lowers it for CUDA on the CPU (``jax.export``) and checks it in Mosaic GPU interpret mode. In interpret mode the
two matmuls and
the register layouts are replaced by their ``jnp`` values (the interpreter lacks wgmma), as in
``ragged_paged_attention_mgpu.py``; ``pytest -m gpu`` checks them on the GPU.

Shape letters as in the package: B batch, N query heads, K kv heads, G = N / K, H head_dim, P pages, L page size.

Grid ``(K, B, splits)``, two warpgroups a program (flash-decoding with GQA packing; the ring, the loader and the
softmax step are ``mgpu_flash``'s, shared with the prefill kernel):

* Warpgroup 0 computes: the G query heads of kv head k for sequence b are the rows of one wgmma tile (G padded to
  wgmma's 64 rows; the padding rows are never stored), ``wgmma`` of Q with K^T over a block of ``block_kv`` keys,
  online softmax in float32 (log2 units), ``wgmma`` of P with V. Only the split's last block is masked (keys past
  the sequence's length).
* Warpgroup 1 streams the split's key blocks: one TMA copy per page of K and of V into a ring of ``stages``
  shared-memory slots, refilled once the compute warpgroup releases a slot.

One split writes the output itself; several write normalized partials [B, K, S, G, H] and their log-sum-exp
(base 2) [B, K, S, G], merged by XLA (``combine``). As in the prefill kernel, a masked key's weight is exactly zero
but still multiplies its V row, so unowned page slots must hold finite values (the engine's pool starts as zeros).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .mgpu_flash import (MAX_PAGE_ROW, META, SMEM_BYTES, SMEM_SLACK, Ring, check_pages, flash_step, init_state,
                         interpret_params, normalized, page_row_width, ring_scratch, stream_pages, swizzled)
from .paged_attention import MASK_VALUE

ROWS = 64  # wgmma's M: a program's G query heads are padded to this many rows


def smem_bytes(*, block_kv: int, stages: int, head_dim: int, itemsize: int, width: int, direct: bool) -> int:
    """Shared memory the kernel asks for: Q rows, the output rows, ``stages`` K and V tiles, the page row."""
    out = ROWS * head_dim * (itemsize if direct else 4) + (0 if direct else 4 * ROWS)
    return ROWS * head_dim * itemsize + out + 2 * stages * block_kv * head_dim * itemsize + 4 * width + SMEM_SLACK


def default_splits(batch: int, kv_heads: int) -> int:
    """Splits a sequence's keys so that the grid has about two programs an SM (132 SMs)."""
    return max(1, round(264 / (batch * kv_heads)))


def split_plan(batch: int, kv_heads: int, max_pages: int, ppb: int, num_splits: int | None) -> tuple[int, int]:
    """(splits, pages a split): ``default_splits`` unless ``num_splits`` is given; each split whole key blocks."""
    want = num_splits or default_splits(batch, kv_heads)
    blocks = -(-max_pages // ppb)
    per = -(-blocks // max(1, min(want, blocks))) * ppb
    return -(-max_pages // per), per


def check_inputs(q, k_pages, page_table, k_scales, pages_per_block, num_splits, num_stages) -> int:
    """What the Mosaic GPU decode kernel takes (ValueError naming what not); returns its pages a key block
    (given, else 64 keys' worth)."""
    kv_heads, _, page_size, head_dim = k_pages.shape
    group = q.shape[1] // kv_heads
    ppb = pages_per_block or max(1, 64 // page_size)
    stages = num_stages or 2
    check_pages(q, k_pages, k_scales, ppb, stages)
    if group % 8 or group > 64:
        raise ValueError(f"backend='mosaic_gpu' needs G = N / K a multiple of 8 up to 64; got G={group}")
    splits, pps = split_plan(q.shape[0], kv_heads, page_table.shape[1], ppb, num_splits)
    width = page_row_width(pps, ppb)
    need = smem_bytes(block_kv=ppb * page_size, stages=stages, head_dim=head_dim, itemsize=q.dtype.itemsize,
                      width=width, direct=splits == 1)
    if width > MAX_PAGE_ROW or need > SMEM_BYTES:
        raise ValueError(f"backend='mosaic_gpu': {ppb * page_size}-key blocks, num_stages={stages} and {pps} pages a "
                         f"split need {need} bytes of shared memory (a Hopper block has {SMEM_BYTES}) or more than "
                         f"8192 pages a split: lower num_stages or pages_per_block, or raise num_splits")
    return ppb


def _kernel(q_ref, kp_ref, vp_ref, meta_ref, pt_ref, *refs, group, page_size, block_kv, stages, chunk, scale,
            direct, interpret):
    # q_ref [B, N, H]; kp_ref, vp_ref [K, P, L, H]; meta_ref [B, META] (length in word 0); pt_ref [B, S, rows,
    # META] the split's page ids; outputs: direct o_ref [B, N, H], else o_ref [B, K, S, G, H] f32, lse_ref
    # [B, K, S, G] f32.
    if direct:
        (o_ref,), scoped = refs[:1], refs[1]
        lse_ref = None
    else:
        (o_ref, lse_ref), scoped = refs[:2], refs[2]
    (q_smem, o_smem, l_smem, k_smem, v_smem, meta_smem, pt_smem), bars, consumed = scoped
    meta_bar, pt_bar, q_bar, k_bar, v_bar = bars
    ring = Ring(k_smem, v_smem, k_bar, v_bar, *consumed, stages)
    kh, b, split, wg = (lax.axis_index(a) for a in ("kv", "b", "split", "wg"))
    head_dim = q_ref.shape[-1]

    plgpu.copy_gmem_to_smem(meta_ref.at[b], meta_smem.at[wg], meta_bar.at[wg])
    plgpu.barrier_wait(meta_bar.at[wg])
    start = split * chunk
    end = jnp.minimum(meta_smem[wg, 0], start + chunk)  # keys [start, end) are this split's
    n_keys = jnp.maximum(end - start, 0)
    steps = lax.div(n_keys + (block_kv - 1), jnp.int32(block_kv))
    full = lax.div(n_keys, jnp.int32(block_kv))  # blocks with no masked key

    @pl.when(wg == 0)
    def _compute():
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(kh * group, group)], q_smem.at[pl.ds(0, group)], q_bar)
        plgpu.barrier_wait(q_bar)
        c = scale * math.log2(math.e)

        def body(step, state, masked):
            in_length = (lambda iota: start + step * block_kv + iota(1) < end) if masked else None
            return flash_step(ring, step, state, q_smem, c=c, keep=in_length, interpret=interpret)

        state = lax.fori_loop(0, full, functools.partial(body, masked=False),
                              init_state(ROWS, head_dim, interpret=interpret))
        state = lax.fori_loop(full, steps, functools.partial(body, masked=True), state)
        o_smem[...] = normalized(state).astype(o_smem.dtype)
        if not direct:  # an empty split weighs nothing in the combine
            _, m, l = state
            l_smem[...] = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)) * (1 / math.log(2)), MASK_VALUE)
        plgpu.commit_smem()
        if direct:
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[b, pl.ds(kh * group, group)])
        else:
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[b, kh, split])
            plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, group)], lse_ref.at[b, kh, split])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _load():
        plgpu.copy_gmem_to_smem(pt_ref.at[b, split], pt_smem, pt_bar)
        plgpu.barrier_wait(pt_bar)
        stream_pages(ring, pt_smem, kp_ref, vp_ref, kv_head=kh, steps=steps, page_size=page_size)


def combine(o_part, lse, out_shape, dtype):
    """Normalized split partials [B, K, S, G, H] and their log-sum-exp (base 2) [B, K, S, G] -> [B, N, H]."""
    mx = lse.max(axis=2, keepdims=True)
    w = jnp.exp2(lse - mx)  # an empty split: lse = MASK_VALUE, weight 0
    out = (o_part * w[..., None]).sum(axis=2) / w.sum(axis=2)[..., None]
    return out.reshape(out_shape).astype(dtype)


def paged_decode_mgpu(q, k_pages, v_pages, lengths, page_table, *, scale: float, pages_per_block: int,
                      num_splits: int | None = None, stages: int = 2, interpret: bool = False):
    """q [B, N, H] -> [B, N, H]: G = N / K a multiple of 8 up to 64, bfloat16 / float16 pages, key blocks of
    ``pages_per_block`` pages (64-256 keys), ``stages`` of them in flight; checked by the dispatch
    (``check_inputs``)."""
    batch, n, head_dim = q.shape
    kv_heads, num_pages, page_size, _ = k_pages.shape
    group = n // kv_heads
    ppb = pages_per_block
    splits, pps = split_plan(batch, kv_heads, page_table.shape[1], ppb, num_splits)
    rows = page_row_width(pps, ppb) // META
    pt = jnp.clip(page_table, 0, num_pages - 1)
    pt = jnp.pad(pt, ((0, 0), (0, splits * pps - pt.shape[1]))).reshape(batch, splits, pps)
    pt = jnp.pad(pt, ((0, 0), (0, 0), (0, rows * META - pps))).reshape(batch, splits, rows, META)
    meta = jnp.zeros((batch, META), jnp.int32).at[:, 0].set(lengths.astype(jnp.int32))
    direct = splits == 1
    dt = q.dtype
    block_kv = ppb * page_size
    if direct:
        out_type = jax.ShapeDtypeStruct(q.shape, dt)
    else:
        out_type = (jax.ShapeDtypeStruct((batch, kv_heads, splits, group, head_dim), jnp.float32),
                    jax.ShapeDtypeStruct((batch, kv_heads, splits, group), jnp.float32))
    kernel = functools.partial(_kernel, group=group, page_size=page_size, block_kv=block_kv, stages=stages,
                               chunk=pps * page_size, scale=scale, direct=direct, interpret=interpret)

    def paged_decode_mgpu_kernel(*refs):  # the name in profiles
        tiles, full, consumed = ring_scratch(stages=stages, block_kv=block_kv, head_dim=head_dim, dtype=dt, ppb=ppb,
                                             consumers=1)
        smem = (swizzled((ROWS, head_dim), dt),
                plgpu.SMEM((ROWS, head_dim), dt if direct else jnp.float32),  # output rows, untiled
                plgpu.SMEM((ROWS,), jnp.float32), *tiles,
                plgpu.SMEM((2, META), jnp.int32), plgpu.SMEM((rows, META), jnp.int32))
        bars = (plgpu.Barrier(num_barriers=2), plgpu.Barrier(num_barriers=1), plgpu.Barrier(num_barriers=1), *full)
        pl.run_scoped(lambda *s: kernel(*refs, s), smem, bars, consumed, collective_axes="wg")

    outs = plgpu.kernel(
        paged_decode_mgpu_kernel, out_type=out_type, grid=(kv_heads, batch, splits),
        grid_names=("kv", "b", "split"), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if interpret else None,
    )(q, k_pages, v_pages, meta, pt)
    if direct:
        return outs
    return combine(*outs, q.shape, dt)
