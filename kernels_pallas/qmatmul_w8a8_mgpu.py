"""W8A8 matmul as a Mosaic GPU kernel for Hopper: int8 x int8 wgmma into int32, both scales in the epilogue.

Public: ``w8a8_matmul_mgpu`` (run by ``quantized_matmul`` where the tile table says ``kernel="mgpu"``) and
``w8a8_matmul_reference`` (plain ``jnp``, the truth).

``y[M, N] = (xq[M, K] @ wq[N, K]^T) * sx[M, 1] * sw[N]``: per-token activation scales ``sx``, per-channel weight
scales ``sw``; the weight is stored K-major (``W8A8Weight``), as int8 tensor-core instructions want B.

Structure (learned from jax's ``hopper_matmul_mgpu``): a persistent grid of one program per SM walks the output
tiles in a planar snake; in each, a memory warpgroup streams ``[cta_tile_m, tile_k]`` tiles of xq and
``[cta_tile_n, tile_k]`` tiles of wq through ``stages`` shared-memory slots (TMA), and two compute warpgroups each
accumulate a ``[tile_m, tile_n]`` int32 half of the CTA tile with wgmma (split along N). The epilogue converts to
float32, multiplies by the tile's ``sx`` rows and ``sw`` columns (loaded straight into the accumulator's row / column
layouts), and stores ``out_dtype`` through shared memory in 64 x 64 pieces.

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
class W8A8Tiles:
    """Static tile sizes: each compute warpgroup's ``tile_m x tile_n``, the K step, the slots in flight, and the
    planar snake's width (output tiles walked along N before stepping M)."""
    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 3
    snake_width: int = 8


def w8a8_matmul_reference(xq, sx, wq, sw, *, out_dtype=jnp.bfloat16):
    """xq [M, K] int8, sx [M] float32, wq [N, K] int8, sw [N] float32 -> [M, N] out_dtype (exact int32 product)."""
    acc = lax.dot_general(xq, wq, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * sx[:, None] * sw[None, :]).astype(out_dtype)


def tiles_of(cfg) -> W8A8Tiles:
    """The tiles a ``TileConfig(kernel="mgpu")`` names: block_m / block_n each compute warpgroup's tile,
    num_stages the slots in flight."""
    return W8A8Tiles(tile_m=cfg.block_m, tile_n=cfg.block_n, stages=cfg.num_stages)


def smem_bytes(t: W8A8Tiles, out_dtype=jnp.bfloat16) -> int:
    """Shared memory the kernel takes: the slots in flight (xq and both warpgroups' wq), the epilogue's pieces
    and the pipeline's barriers."""
    return t.stages * (t.tile_m + 2 * t.tile_n) * t.tile_k + mgpu_matmul.out_smem_bytes(out_dtype) + SLACK


def fit_stages(t: W8A8Tiles, out_dtype=jnp.bfloat16) -> W8A8Tiles:
    """The tiles with as many of the requested stages (at least 2) as fit in shared memory with this output."""
    return mgpu_matmul.fit_stages(t, smem_bytes, out_dtype)


def _tiles_ok(t: W8A8Tiles) -> bool:
    return t.tile_m % 64 == 0 and t.tile_n % EPI == 0 and t.tile_n <= 256 and t.tile_k == 128 and t.stages >= 2


def fits(n: int, k: int, tiles: W8A8Tiles) -> bool:
    """Whether the kernel takes N out features and K in features with these tiles (M is padded by the caller)."""
    return _tiles_ok(tiles) and n % (2 * tiles.tile_n) == 0 and k % tiles.tile_k == 0


def check_inputs(xq, sx, wq, sw, tiles: W8A8Tiles, out_dtype=jnp.bfloat16) -> None:
    """ValueError naming what the kernel does not take."""
    if xq.dtype != jnp.int8 or wq.dtype != jnp.int8 or xq.ndim != 2 or wq.ndim != 2:
        raise ValueError(f"w8a8_matmul_mgpu takes xq [M, K] and wq [N, K] int8; got {xq.dtype} {xq.shape} and "
                         f"{wq.dtype} {wq.shape}")
    (m, k), (n, k2) = xq.shape, wq.shape
    if k != k2:
        raise ValueError(f"w8a8_matmul_mgpu: xq has K={k} columns, wq K={k2}")
    if sx.shape != (m,) or sw.shape != (n,) or sx.dtype != jnp.float32 or sw.dtype != jnp.float32:
        raise ValueError(f"w8a8_matmul_mgpu takes sx [M={m}] and sw [N={n}] float32; got {sx.dtype} {sx.shape} and "
                         f"{sw.dtype} {sw.shape}")
    t = tiles
    if not _tiles_ok(t):
        raise ValueError(f"w8a8_matmul_mgpu tiles: tile_m a multiple of 64, tile_n of {EPI} up to 256, tile_k 128 "
                         f"(one 128-byte swizzle of int8), stages >= 2; got {t}")
    mgpu_matmul.check_smem("w8a8_matmul_mgpu", t, smem_bytes, out_dtype)
    if m % t.tile_m or not fits(n, k, t):
        raise ValueError(f"w8a8_matmul_mgpu needs M % {t.tile_m}, N % {2 * t.tile_n} and K % {t.tile_k} == 0; got "
                         f"M={m}, N={n}, K={k} (pad M; pick tiles that divide N)")


def _kernel(x_gmem, sx_gmem, w_gmem, sw_gmem, out_gmem, *, tiles: W8A8Tiles):
    tile_m, tile_n, tile_k = tiles.tile_m, tiles.tile_n, tiles.tile_k
    swizzle = mgpu_matmul.swizzle(tile_k, 1)  # 128 int8 = one 128-byte row
    in_specs = [plgpu.BlockSpec((tile_m, tile_k), lambda ki: (0, ki), transforms=swizzle, memory_space=plgpu.SMEM),
                plgpu.BlockSpec((2 * tile_n, tile_k), lambda ki: (0, ki), transforms=swizzle,
                                memory_space=plgpu.SMEM)]

    def mma(wg, scratch, idxs, x_smem, w_smem, acc_ref):
        plgpu.wgmma(acc_ref, x_smem, w_smem.at[pl.ds(wg * tile_n, tile_n)].T)
        plgpu.wgmma_wait(0)
        return acc_ref

    def epilogue(acc, wg, mi, wg_n0, out_smem):
        for em in range(tile_m // EPI):
            sx = plgpu.load(sx_gmem.at[pl.ds(mi * tile_m + em * EPI, EPI)], (),
                            layout=plgpu.Layout.WGMMA.reduce(1), optimized=False)
            for en in range(tile_n // EPI):
                sw = plgpu.load(sw_gmem.at[pl.ds(wg_n0 + en * EPI, EPI)], (),
                                layout=plgpu.Layout.WGMMA.reduce(0), optimized=False)
                part = acc[em * EPI:(em + 1) * EPI, en * EPI:(en + 1) * EPI].astype(jnp.float32)
                part = part * lax.broadcast_in_dim(sx, part.shape, [0]) * lax.broadcast_in_dim(sw, part.shape, [1])
                mgpu_matmul.store_piece(
                    part, out_smem, wg, (em * (tile_n // EPI) + en) % 2,
                    out_gmem.at[pl.ds(mi * tile_m + em * EPI, EPI), pl.ds(wg_n0 + en * EPI, EPI)])

    mgpu_matmul.persistent_matmul(x_gmem, (w_gmem,), out_gmem, tiles=tiles, in_specs=in_specs,
                                  columns=lambda i, g, n_slice: g.at[n_slice], acc_dtype=jnp.int32, mma=mma,
                                  epilogue=epilogue)


@functools.partial(jax.jit, static_argnames=("tiles", "out_dtype", "num_sms"))
def _w8a8_matmul_mgpu(xq, sx, wq, sw, *, tiles: W8A8Tiles, out_dtype, num_sms: int):
    kernel = functools.partial(_kernel, tiles=tiles)

    def w8a8_matmul_mgpu_kernel(x_gmem, sx_gmem, w_gmem, sw_gmem, out_gmem):  # the name in profiles
        kernel(x_gmem, sx_gmem, w_gmem, sw_gmem, out_gmem)

    return mgpu_matmul.launch(w8a8_matmul_mgpu_kernel, (xq.shape[0], wq.shape[0]), out_dtype, num_sms,
                              xq, sx, wq, sw)


def w8a8_matmul_mgpu(xq, sx, wq, sw, *, tiles: W8A8Tiles = W8A8Tiles(), out_dtype=jnp.bfloat16,
                     num_sms: int | None = None):
    """xq [M, K] int8, sx [M] float32, wq [N, K] int8, sw [N] float32 -> [M, N] out_dtype on a Hopper GPU; M, N
    and K multiples of the tiles (``check_inputs``). ``num_sms``: programs of the persistent grid (default: the
    GPU's SM count)."""
    check_inputs(xq, sx, wq, sw, tiles, out_dtype)
    tiles_total = (xq.shape[0] // tiles.tile_m) * (wq.shape[0] // (2 * tiles.tile_n))
    return _w8a8_matmul_mgpu(xq, sx, wq, sw, tiles=tiles, out_dtype=jnp.dtype(out_dtype),
                             num_sms=mgpu_matmul.num_programs(num_sms, tiles_total))
