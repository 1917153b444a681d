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
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
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


def persistent_matmul(x_gmem, w_gmems, out_gmem, *, tiles, in_specs, columns, acc_dtype, mma, epilogue,
                      scratch: dict | None = None, acc_transposed: bool = False) -> None:
    """The kernels' common body: the warp-specialized pipeline over K (``in_specs``: x's, then each weight input's),
    run for each ``[tile_m, 2 * tile_n]`` output tile of this program (``walk_tiles``) into a ``[tile_m, tile_n]``
    ``acc_dtype`` accumulator a compute warpgroup, then the epilogue.

    columns(i, w_gmem, n_slice): weight input i's view for the CTA's output columns. mma(wg, scratch, idxs, x_smem,
    *w_smems, acc_ref) -> acc_ref: one K step (``scratch``: the refs of the extra shared-memory ``scratch`` types).
    epilogue(acc, wg, mi, wg_n0, out_smem): the finished accumulator of output rows ``mi * tile_m`` and columns
    from ``wg_n0`` (``store_piece`` writes it out); every wgmma has completed when it runs. acc_transposed: the
    accumulator holds the tile's transpose, ``[tile_n, tile_m]`` (the weight was wgmma's A operand)."""
    tile_m, tile_n, tile_k, cta_n = tiles.tile_m, tiles.tile_n, tiles.tile_k, 2 * tiles.tile_n
    (m, k), n = x_gmem.shape, out_gmem.shape[1]

    def pipeline(body, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // tile_k,), memory_registers=40, max_concurrent_steps=tiles.stages, in_specs=in_specs,
            wg_axis="wg", num_compute_wgs=2, compute_context=compute_context)

    ignore = lambda *_, **__: None
    scratch = scratch or {}

    @functools.partial(pl.run_scoped, allocs=pipeline(ignore, ignore).get_allocations(x_gmem, *w_gmems),
                       **scratch, out_smem=out_smem(out_gmem.dtype), collective_axes="wg")
    def _scope(allocs, out_smem, **scratch_refs):
        wg = lax.axis_index("wg")

        def tile(mi, ni):
            m_slice = pl.ds(mi * tile_m, tile_m)
            n_slice = pl.ds(ni * cta_n, cta_n)
            wg_n0 = ni * cta_n + wg * tile_n  # this warpgroup's first output column

            def compute_context(run):
                acc_shape = (tile_n, tile_m) if acc_transposed else (tile_m, tile_n)

                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(acc_shape, acc_dtype))
                def _acc(acc_ref):
                    run(acc_ref)
                    plgpu.wgmma_wait(0)  # a step may leave its wgmma in flight
                    acc = acc_ref[...]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    epilogue(acc, wg, mi, wg_n0, out_smem)

            pipeline(functools.partial(mma, wg, scratch_refs), compute_context)(
                x_gmem.at[m_slice, :], *(columns(i, g, n_slice) for i, g in enumerate(w_gmems)), allocations=allocs)

        walk_tiles(m // tile_m, n // cta_n, tiles.snake_width, tile)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def store_piece(part, out_ref, wg, slot, dst, *, transposed: bool = False) -> None:
    """One epilogue piece: wait until the slot's previous copy has read it, write ``part`` there in the output
    dtype (transposed: ``part.T``, through the register layout that stores a transpose), copy it to the
    global-memory window ``dst``."""
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    if transposed:
        out_ref.at[wg, slot].T[...] = plgpu.layout_cast(part.astype(out_ref.dtype), plgpu.Layout.WGMMA_TRANSPOSED)
    else:
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
