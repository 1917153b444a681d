"""The flash-attention pieces shared by the Mosaic GPU (Hopper) attention kernels: a ring of K / V shared-memory
slots with its barriers, the loader warpgroup that fills it one TMA copy per page, one online-softmax step of a
compute warpgroup (wgmma Q.K^T, mask, softmax in log2 units, wgmma P.V), the page rows the loader reads, and the
input checks and shared-memory limits both kernels apply.

Used by ``ragged_paged_attention_mgpu.py`` (prefill: rows are query tokens of one head) and
``paged_attention_mgpu.py`` (decode: rows are the query heads of one KV head). In interpret mode (the Mosaic GPU
interpreter on the CPU, which lacks wgmma and register layouts) the two matmuls and the layouts are their ``jnp``
values. Shape letters as in the package (L page size, H head_dim).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .paged_attention import MASK_VALUE

META = 32  # int32 words a metadata / page-table row is padded to (TMA copies move multiples of 128 bytes)
MAX_PAGE_ROW = 256 * META  # page ids a page row holds: 256 rows of META (a TMA copy's limit along a dimension)
SMEM_BYTES = 232448  # shared memory a Hopper (H100 / H200) block may take: 227 KiB
SMEM_SLACK = 4096  # barriers, metadata rows and buffer alignment on top of the tiles


def page_row_width(max_pages: int, ppb: int) -> int:
    """int32 words of a page row: whole key blocks of ``ppb`` pages, then whole 128-byte rows."""
    width = -(-max_pages // ppb) * ppb
    return -(-width // META) * META


def interpret_params():
    # Mosaic GPU interpret mode (simulated warpgroups, shared memory and barriers on the CPU); private in jax 0.10.
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


def swizzled(shape, dtype):
    """Shared memory that wgmma reads: (8, 64) tiles, 128-byte swizzle."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def ring_scratch(*, stages: int, block_kv: int, head_dim: int, dtype, ppb: int, consumers: int):
    """The ring's shared memory (k, v), its full barriers (one arrival a page copy) and its free barriers (one
    arrival a compute warpgroup), in the order ``Ring`` takes them."""
    tiles = (swizzled((stages, block_kv, head_dim), dtype),) * 2
    full = (plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),) * 2
    free = (plgpu.Barrier(num_arrivals=consumers, num_barriers=stages),) * 2
    return tiles, full, free


def check_pages(q, k_pages, k_scales, ppb: int, num_stages: int | None) -> None:
    """What both Mosaic GPU attention kernels take (ValueError naming what not): key blocks of ``ppb`` pages
    holding 64, 128 or 256 keys, bfloat16 / float16 q and pages in one dtype, head_dim a multiple of 64."""
    page_size, head_dim = k_pages.shape[2], k_pages.shape[3]
    if ppb * page_size % 64 or ppb * page_size > 256 or num_stages is not None and num_stages < 2:
        raise ValueError(f"backend='mosaic_gpu' takes key blocks of 64, 128 or 256 keys and num_stages >= 2; got "
                         f"pages_per_block={ppb} x L={page_size} = {ppb * page_size} keys, num_stages={num_stages}")
    if k_scales is not None:
        raise ValueError("backend='mosaic_gpu' takes bfloat16 / float16 pages only; int8 pages run on 'triton'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"backend='mosaic_gpu' takes bfloat16 or float16 q and pages; got {q.dtype}")
    if head_dim % 64 or not 8 <= page_size <= 256:
        raise ValueError(f"backend='mosaic_gpu' needs head_dim a multiple of 64 and a page size in 8..256; got "
                         f"H={head_dim}, L={page_size}")
    if k_pages.dtype != q.dtype:
        raise ValueError(f"backend='mosaic_gpu' needs q and pages in one dtype; got {q.dtype} and {k_pages.dtype}")


@dataclasses.dataclass(frozen=True)
class Ring:
    """``stages`` slots of ``block_kv`` keys: k, v [stages, block_kv, H] shared memory; k_full / v_full barriers
    (the loader's copies of a slot landed), k_free / v_free (the compute warpgroups are done with it)."""
    k: Any
    v: Any
    k_full: Any
    v_full: Any
    k_free: Any
    v_free: Any
    stages: int

    def slot(self, step):
        return lax.rem(step, jnp.array(self.stages, step.dtype))


def layout(x, *, reduced: bool = False, interpret: bool):
    """x in wgmma's accumulator layout (its row-vector layout if ``reduced``); as is in interpret mode."""
    if interpret:
        return x
    return plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1) if reduced else plgpu.Layout.WGMMA)


def init_state(rows: int, head_dim: int, *, interpret: bool):
    """(acc [rows, H], running max [rows], running sum [rows]) before the first key block."""
    return (layout(jnp.zeros((rows, head_dim), jnp.float32), interpret=interpret),
            layout(jnp.full((rows,), MASK_VALUE, jnp.float32), reduced=True, interpret=interpret),
            layout(jnp.zeros((rows,), jnp.float32), reduced=True, interpret=interpret))


def flash_step(ring: Ring, step, state, q_rows, *, c: float, keep: Callable | None, interpret: bool):
    """One key block: waits for its K, S = Q K^T [rows, block_kv], releases K, masks where ``keep(iota)`` is false
    (``iota(dim)`` indexes S), online softmax (``c`` = scale * log2 e), waits for V, O += P V, releases V."""
    acc, m, l = state
    rows, block_kv = q_rows.shape[0], ring.k.shape[1]
    slot = ring.slot(step)
    plgpu.barrier_wait(ring.k_full.at[slot])
    if interpret:
        s = lax.dot_general(q_rows[...], ring.k[slot], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_rows, plgpu.transpose_ref(ring.k.at[slot], (1, 0)))
            return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((rows, block_kv), jnp.float32))
    plgpu.barrier_arrive(ring.k_free.at[slot])
    if keep is not None:
        shape = (rows, block_kv)
        iota = (functools.partial(lax.broadcasted_iota, jnp.int32, shape) if interpret else
                functools.partial(plgpu.broadcasted_iota, jnp.int32, shape, layout=plgpu.Layout.WGMMA))
        s = jnp.where(keep(iota), s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1) * c)
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
    l = l * alpha + p.sum(axis=1)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    p = p.astype(q_rows.dtype)
    plgpu.barrier_wait(ring.v_full.at[slot])
    if interpret:
        acc = acc + lax.dot_general(p, ring.v[slot], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p, ring.v.at[slot])
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    plgpu.barrier_arrive(ring.v_free.at[slot])
    return acc, m_new, l


def normalized(state):
    """acc / running sum (rows that saw no key: zeros)."""
    acc, _, l = state
    return acc / lax.broadcast_in_dim(jnp.where(l > 0, l, 1.0), acc.shape, [0])


def stream_pages(ring: Ring, pt_smem, kp_ref, vp_ref, *, kv_head, steps, page_size: int):
    """The loader warpgroup: key blocks [0, steps) of the page ids in ``pt_smem`` [rows, META] (block i holds
    pages i * ppb ...), one TMA copy per page of K and of V (kp_ref, vp_ref [K, P, L, H]) into the ring; a slot is
    refilled once every compute warpgroup released it, and the last releases are observed before the barriers go."""
    ppb = ring.k.shape[1] // page_size
    stages = ring.stages

    def issue(step):
        slot = ring.slot(step)
        for i in range(ppb):
            idx = step * ppb + i
            page = pt_smem[lax.div(idx, jnp.int32(META)), lax.rem(idx, jnp.int32(META))]
            dst = pl.ds(i * page_size, page_size)
            plgpu.copy_gmem_to_smem(kp_ref.at[kv_head, page], ring.k.at[slot, dst], ring.k_full.at[slot])
            plgpu.copy_gmem_to_smem(vp_ref.at[kv_head, page], ring.v.at[slot, dst], ring.v_full.at[slot])

    @pl.loop(0, jnp.minimum(steps, stages))
    def _fill(step):
        issue(step)

    @pl.loop(stages, jnp.maximum(steps, stages))
    def _refill(step):
        slot = ring.slot(step)
        plgpu.barrier_wait(ring.k_free.at[slot])  # every compute warpgroup is done with the slot's K and V
        plgpu.barrier_wait(ring.v_free.at[slot])
        issue(step)

    @pl.loop(jnp.maximum(steps - stages, 0), steps)
    def _drain(step):  # the last releases: every phase of the slot barriers is observed before they are freed
        slot = ring.slot(step)
        plgpu.barrier_wait(ring.k_free.at[slot])
        plgpu.barrier_wait(ring.v_free.at[slot])
