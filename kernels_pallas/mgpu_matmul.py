"""What the Mosaic GPU (Hopper) matmul kernels share: ``qmatmul_w8a8_mgpu`` (int8 x int8) and
``qmatmul_mixed_mgpu`` (int8 weights widened to bfloat16).

Both run a persistent grid of one program per SM that walks ``[tile_m, 2 * tile_n]`` output tiles in a planar snake
(``walk_tiles``), two compute warpgroups each owning a ``tile_n`` half, and an epilogue that stores ``EPI x EPI``
pieces through two shared-memory slots a warpgroup (``out_smem``, ``store_piece``). Shared memory is budgeted here
too: ``fit_stages`` drops pipeline stages until a kernel's tiles fit with the requested output dtype (a float32
output doubles the epilogue's slots).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

from .mgpu_flash import SMEM_BYTES

EPI = 64  # the epilogue's square pieces
SLACK = 512  # the pipeline's barriers and alignment


def swizzle(row_bytes: int, itemsize: int) -> tuple:
    """Tiling + swizzle transforms for a shared-memory tile whose rows are ``row_bytes`` long (wider rows are
    several 128-byte swizzle tiles)."""
    width = min(128, row_bytes)
    return (plgpu.TilingTransform((8, width // itemsize)), plgpu.SwizzleTransform(width))


def out_smem(out_dtype):
    """The epilogue's scratch: two ``EPI x EPI`` slots for each compute warpgroup."""
    itemsize = jnp.dtype(out_dtype).itemsize
    return plgpu.SMEM((2, 2, EPI, EPI), out_dtype, transforms=swizzle(EPI * itemsize, itemsize))


def out_smem_bytes(out_dtype) -> int:
    return 2 * 2 * EPI * EPI * jnp.dtype(out_dtype).itemsize


def fit_stages(tiles, smem_bytes, out_dtype=jnp.bfloat16):
    """``tiles`` with as many of its requested ``stages`` (at least 2) as ``smem_bytes(tiles, out_dtype)`` fits in
    a Hopper block's shared memory."""
    while tiles.stages > 2 and smem_bytes(tiles, out_dtype) > SMEM_BYTES:
        tiles = dataclasses.replace(tiles, stages=tiles.stages - 1)
    return tiles


def walk_tiles(m_iters: int, n_iters: int, snake_width: int, body) -> None:
    """Each program of the persistent grid runs ``body(mi, ni)`` for its share of the output tiles, walked along N
    ``snake_width`` tiles at a time before stepping M."""

    @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
    def _tile(loop):
        (lin,) = loop.index
        body(*plgpu.planar_snake(lin, (m_iters, n_iters), 1, snake_width))


def store_piece(part, out_ref, wg, slot, dst) -> None:
    """One epilogue piece: wait until the slot's previous copy has read it, write ``part`` there in the output
    dtype, copy it to the global-memory window ``dst``."""
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    out_ref[wg, slot] = part.astype(out_ref.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_ref.at[wg, slot], dst)


def launch(named_body, out_shape: tuple, out_dtype, num_sms: int, *args):
    """Run ``named_body`` (its name is the kernel's name in profiles) on ``num_sms`` programs of three warpgroups
    (one memory, two compute) with warpgroup semantics."""
    return plgpu.kernel(
        named_body, out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=(num_sms,), grid_names=("sm",), num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*args)


def num_programs(num_sms: int | None, tiles_total: int) -> int:
    """Programs of the persistent grid: the GPU's SM count (or ``num_sms``), at most one a tile."""
    if num_sms is None:
        num_sms = getattr(jax.devices()[0], "core_count", None) or 132
    return min(num_sms, tiles_total)


def check_smem(name: str, tiles, smem_bytes, out_dtype) -> None:
    """ValueError when ``tiles`` with this output dtype do not fit in a Hopper block's shared memory."""
    need = smem_bytes(tiles, out_dtype)
    if need > SMEM_BYTES:
        raise ValueError(f"{name} tiles {tiles} with {jnp.dtype(out_dtype).name} output need {need} bytes of shared "
                         f"memory; a Hopper block has {SMEM_BYTES} (fewer stages: fit_stages)")
