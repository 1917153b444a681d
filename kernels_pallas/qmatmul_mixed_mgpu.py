"""Weight-only int8 matmul as a Mosaic GPU kernel for Hopper: int8 weights widened to bfloat16 in shared memory,
bfloat16 x bfloat16 wgmma into float32, the per-channel scale in the epilogue.

Public: ``int8_matmul_mgpu`` (run by ``quantized_matmul`` where the tile table says ``kernel="mgpu"`` for an
``Int8Weight``) and ``int8_matmul_reference`` (plain ``jnp``, the truth).

``y[M, N] = (x[M, K] @ wq[K, N]) * sw[N]`` with ``wq`` stored ``[K, N]`` or K-major ``[N, K]`` (``k_major``).
int8 values are exact in bfloat16, so the product is the float dot of the quantized weight; only the float32
accumulation order differs from the reference.

Structure (the W8A8 kernel's, ``qmatmul_w8a8_mgpu.py``): a persistent grid of one program per SM walks the output
tiles in a planar snake; a memory warpgroup streams ``[tile_m, tile_k]`` tiles of x and the int8 weight tile of
both compute warpgroups through ``stages`` shared-memory slots (TMA). Each compute warpgroup owns a ``tile_n``
slice of the CTA's columns: per K step it loads its int8 slice from shared memory (eight values a thread in the
``WGMMA_UPCAST_2X`` layout), widens it to bfloat16 into one of its two shared-memory buffers, and issues one wgmma
over it; the pipeline releases a step's slots one step late (``delay_release=1``), so widening step k overlaps
step k - 1's wgmma. The weight is read from HBM once per ``tile_m`` rows of x, as half the bytes of a bfloat16
weight. On the H100 at M = 512 (session 20): qkv 1.05x faster than XLA's bf16 dot, gate_up 1.34x and down 1.67x
slower -- the widening's instruction issue bounds it (experiments/results/qmatmul_diag/s20_int8_mgpu/).

Shape letters as in the package: M rows (tokens), K contraction (in features), N out features.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import mgpu_matmul
from .mgpu_matmul import EPI, SLACK


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedTiles:
    """Static tile sizes: each compute warpgroup's ``tile_m x tile_n``, the K step (64: one 128-byte swizzle row
    of bfloat16 x), the slots in flight, and the planar snake's width (output tiles walked along N first)."""
    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    snake_width: int = 8


def int8_matmul_reference(x, wq, sw, *, k_major: bool = False, out_dtype=jnp.bfloat16):
    """x [M, K] float, wq [K, N] int8 ([N, K] if k_major), sw [N] float32 -> [M, N] out_dtype (float32 math)."""
    w = (wq.T if k_major else wq).astype(jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return (y * sw[None, :].astype(jnp.float32)).astype(out_dtype)


def tiles_of(cfg) -> MixedTiles:
    """The tiles a ``TileConfig(kernel="mgpu")`` names for a weight-only int8 weight: block_m / block_n each
    compute warpgroup's tile, num_stages the slots in flight."""
    return MixedTiles(tile_m=cfg.block_m, tile_n=cfg.block_n, stages=cfg.num_stages)


def smem_bytes(t: MixedTiles, out_dtype=jnp.bfloat16) -> int:
    """Shared memory the kernel takes: the slots in flight (x and both warpgroups' int8 weight), each warpgroup's
    two bfloat16 weight buffers, the epilogue's pieces and the pipeline's barriers."""
    slots = t.stages * (t.tile_m * t.tile_k * 2 + 2 * t.tile_n * t.tile_k)
    return slots + 2 * 2 * t.tile_n * t.tile_k * 2 + mgpu_matmul.out_smem_bytes(out_dtype) + SLACK


def fit_stages(t: MixedTiles, out_dtype=jnp.bfloat16) -> MixedTiles:
    """The tiles with as many of the requested stages (at least 2) as fit in shared memory with this output."""
    return mgpu_matmul.fit_stages(t, smem_bytes, out_dtype)


def _tiles_ok(t: MixedTiles) -> bool:
    return (t.tile_m % 64 == 0 and t.tile_m <= 256 and t.tile_n in (64, 128) and t.tile_k == 64
            and t.stages >= 2)


def fits(n: int, k: int, tiles: MixedTiles) -> bool:
    """Whether the kernel takes N out features and K in features with these tiles (M is padded by the caller)."""
    return _tiles_ok(tiles) and n % (2 * tiles.tile_n) == 0 and k % tiles.tile_k == 0


def check_inputs(x, wq, sw, tiles: MixedTiles, k_major: bool, out_dtype=jnp.bfloat16) -> None:
    """ValueError naming what the kernel does not take."""
    if x.dtype != jnp.bfloat16 or wq.dtype != jnp.int8 or x.ndim != 2 or wq.ndim != 2:
        raise ValueError(f"int8_matmul_mgpu takes x [M, K] bfloat16 and wq int8 [K, N] (or [N, K] k_major); got "
                         f"{x.dtype} {x.shape} and {wq.dtype} {wq.shape}")
    m, k = x.shape
    k2, n = wq.shape[::-1] if k_major else wq.shape
    if k != k2:
        raise ValueError(f"int8_matmul_mgpu: x has K={k} columns, wq K={k2} (k_major={k_major})")
    if sw.shape != (n,) or sw.dtype != jnp.float32:
        raise ValueError(f"int8_matmul_mgpu takes sw [N={n}] float32; got {sw.dtype} {sw.shape}")
    t = tiles
    if not _tiles_ok(t):
        raise ValueError(f"int8_matmul_mgpu tiles: tile_m a multiple of 64 up to 256, tile_n 64 or 128, "
                         f"tile_k 64 (one 128-byte swizzle of bfloat16), stages >= 2; got {t}")
    mgpu_matmul.check_smem("int8_matmul_mgpu", t, smem_bytes, out_dtype)
    if m % t.tile_m or not fits(n, k, t):
        raise ValueError(f"int8_matmul_mgpu needs M % {t.tile_m}, N % {2 * t.tile_n} and K % {t.tile_k} == 0; got "
                         f"M={m}, N={n}, K={k} (pad M; pick tiles that divide N)")


def _kernel(x_gmem, w_gmem, sw_gmem, out_gmem, *, tiles: MixedTiles, k_major: bool, out_dtype):
    tile_m, tile_n, tile_k = tiles.tile_m, tiles.tile_n, tiles.tile_k
    m, k = x_gmem.shape
    n = w_gmem.shape[0] if k_major else w_gmem.shape[1]
    cta_n = 2 * tile_n  # the two compute warpgroups split the CTA tile along N
    m_iters, n_iters, k_iters = m // tile_m, n // cta_n, k // tile_k
    x_swizzle = mgpu_matmul.swizzle(tile_k * 2, 2)
    if k_major:  # [cta_n, tile_k] int8 tiles; each warpgroup widens its [tile_n, tile_k] rows
        w_block, w_index, w_swizzle = (cta_n, tile_k), (lambda ki: (0, ki)), mgpu_matmul.swizzle(tile_k, 1)
        wb_shape, wb_swizzle = (tile_n, tile_k), mgpu_matmul.swizzle(tile_k * 2, 2)
    else:  # [tile_k, cta_n] int8 tiles; each warpgroup widens its [tile_k, tile_n] columns
        w_block, w_index, w_swizzle = (tile_k, cta_n), (lambda ki: (ki, 0)), mgpu_matmul.swizzle(tile_n, 1)
        wb_shape, wb_swizzle = (tile_k, tile_n), mgpu_matmul.swizzle(tile_n * 2, 2)

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, max_concurrent_steps=tiles.stages,
            in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda ki: (0, ki), transforms=x_swizzle,
                                      memory_space=plgpu.SMEM, delay_release=1),
                      plgpu.BlockSpec(w_block, w_index, transforms=w_swizzle, memory_space=plgpu.SMEM,
                                      delay_release=1)],
            wg_axis="wg", num_compute_wgs=2, compute_context=compute_context)

    ignore = lambda *_, **__: None

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
                       wb_smem=plgpu.SMEM((2, 2, *wb_shape), jnp.bfloat16, transforms=wb_swizzle),
                       out_smem=mgpu_matmul.out_smem(out_dtype), collective_axes="wg")
    def _scope(allocs, wb_smem, out_smem):
        wg = lax.axis_index("wg")

        def tile(mi, ni):
            m_slice = pl.ds(mi * tile_m, tile_m)
            n_slice = pl.ds(ni * cta_n, cta_n)
            wg_n0 = ni * cta_n + wg * tile_n  # this warpgroup's first output column

            def compute_context(run):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _acc(acc_ref):
                    run(acc_ref)
                    plgpu.wgmma_wait(0)  # the last step's wgmma is still in flight
                    acc = acc_ref[...]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    for en in range(tile_n // EPI):
                        sw = plgpu.load(sw_gmem.at[pl.ds(wg_n0 + en * EPI, EPI)], (),
                                        layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
                        for em in range(tile_m // EPI):
                            part = acc[em * EPI:(em + 1) * EPI, en * EPI:(en + 1) * EPI]
                            part = part * lax.broadcast_in_dim(sw, part.shape, [1])
                            mgpu_matmul.store_piece(
                                part, out_smem, wg, (en * (tile_m // EPI) + em) % 2,
                                out_gmem.at[pl.ds(mi * tile_m + em * EPI, EPI), pl.ds(wg_n0 + en * EPI, EPI)])

            def mma(idxs, x_smem, w_smem, acc_ref):
                # Widen step ki's weight slice while step ki - 1's wgmma runs (it reads the other buffer); the
                # pipeline releases a step's slots one step late (delay_release), after wgmma_wait(1) saw it done.
                (ki,) = idxs
                wb = wb_smem.at[wg, lax.rem(ki, 2)]
                w_slice = w_smem.at[pl.ds(wg * tile_n, tile_n)] if k_major else w_smem.at[:, pl.ds(wg * tile_n, tile_n)]
                # eight int8 a thread in one 8-byte load, widened in registers, stored as one 16-byte vector
                wb[...] = plgpu.load(w_slice, (), layout=plgpu.Layout.WGMMA_UPCAST_2X).astype(jnp.bfloat16)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, x_smem, wb.T if k_major else wb)
                plgpu.wgmma_wait(1)
                return acc_ref

            pipeline(mma, compute_context)(x_gmem.at[m_slice, :],
                                           w_gmem.at[n_slice, :] if k_major else w_gmem.at[:, n_slice],
                                           allocations=allocs)

        mgpu_matmul.walk_tiles(m_iters, n_iters, tiles.snake_width, tile)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("tiles", "k_major", "out_dtype", "num_sms"))
def _int8_matmul_mgpu(x, wq, sw, *, tiles: MixedTiles, k_major: bool, out_dtype, num_sms: int):
    kernel = functools.partial(_kernel, tiles=tiles, k_major=k_major, out_dtype=out_dtype)
    n = wq.shape[0] if k_major else wq.shape[1]

    def int8_matmul_mgpu_kernel(x_gmem, w_gmem, sw_gmem, out_gmem):  # the name in profiles
        kernel(x_gmem, w_gmem, sw_gmem, out_gmem)

    return mgpu_matmul.launch(int8_matmul_mgpu_kernel, (x.shape[0], n), out_dtype, num_sms, x, wq, sw)


def int8_matmul_mgpu(x, wq, sw, *, k_major: bool = False, tiles: MixedTiles = MixedTiles(),
                     out_dtype=jnp.bfloat16, num_sms: int | None = None):
    """x [M, K] bfloat16, wq [K, N] int8 ([N, K] if k_major), sw [N] float32 -> [M, N] out_dtype on a Hopper GPU;
    M, N and K multiples of the tiles, and tiles that fit in shared memory (``check_inputs``, ``fit_stages``).
    ``num_sms``: programs of the persistent grid (default: the GPU's SM count)."""
    check_inputs(x, wq, sw, tiles, k_major, out_dtype)
    n = wq.shape[0] if k_major else wq.shape[1]
    tiles_total = (x.shape[0] // tiles.tile_m) * (n // (2 * tiles.tile_n))
    return _int8_matmul_mgpu(x, wq, sw, tiles=tiles, k_major=bool(k_major), out_dtype=jnp.dtype(out_dtype),
                             num_sms=mgpu_matmul.num_programs(num_sms, tiles_total))
