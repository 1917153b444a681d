"""Weight-only int8 and int4 matmuls as one Mosaic GPU kernel for Hopper: the quantized weight widened to bfloat16
on the compute warpgroups, bfloat16 x bfloat16 wgmma into float32.

Public: ``int8_matmul_mgpu`` / ``int4_matmul_mgpu`` (run by ``quantized_matmul`` where the tile table, or a
``config``, says ``kernel="mgpu"``) and ``int8_matmul_reference`` / ``int4_matmul_reference`` (plain ``jnp``).

* int8: ``y[M, N] = (x[M, K] @ wq[K, N]) * sw[N]`` with ``wq`` stored ``[K, N]`` or K-major ``[N, K]``; int8 values
  are exact in bfloat16, so only the float32 accumulation order differs from the reference; the per-channel
  scale is applied in the epilogue.
* int4 (K-major ``Int4Weight``, group 128): one group a K step. Its packed ``[N, 64]`` bytes hold the group's first
  64 rows along K in their low nibbles and the last 64 in their high nibbles (half-group packing,
  ``quant_formats``), so the two nibble planes widen into the group's two halves, each weight as
  ``u * scale + offset`` (``offset = -zero * scale``) rounded once to bfloat16 (as the Triton kernels'
  ``scale_in_bf16``); the nibbles take Mosaic GPU's signed-int8 conversion (four PTX instructions a pair).

Structure (the W8A8 kernel's, ``qmatmul_w8a8_mgpu.py``; shared pieces in ``mgpu_matmul.py``): a persistent grid of
one program per SM walks the output tiles in a planar snake; a memory warpgroup streams ``[tile_m, tile_k]`` tiles
of x and the packed weight tile of both compute warpgroups through ``stages`` shared-memory slots (TMA). Each
compute warpgroup owns a ``tile_n`` slice of the CTA's columns and loads its packed slice from shared memory each
K step (eight bytes a thread in the ``WGMMA_UPCAST_2X`` layout). Two ways on from there (``MixedTiles.regs``):

* shared memory (any layout): widen into one of two bfloat16 buffers, one wgmma over it; slots are released a step
  late (``delay_release=1``), so widening step k overlaps step k - 1's wgmma.
* registers (``regs``, K-major weights: every int4 one, int8 ``[N, K]``): the widened ``[tile_n, tile_k]`` tile is
  wgmma's A operand straight from registers and x's tile (transposed) its B operand, so the accumulator is the
  output tile's transpose, stored transposed by the epilogue (``WGMMA_TRANSPOSED``). Each wgmma is waited for at
  once: with the next step's widening in flight (``wgmma_wait(1)``) the results were wrong on the H100, as the
  register allocator does not see wgmma's asynchronous read of its register operand; the other warpgroup's work
  overlaps it instead. No widened stores, no buffers: on the H100 at M = 512 (session 21) int8 K-major qkv 45.1 us,
  o 33.0, gate_up 197.7 (bf16 56.4 / 41.9 / 165.4), int4 qkv 57.3, o 34.4, gate_up 214.5, down 100.5 (bf16 74.5).
  The shared-memory way stays for ``[K, N]`` int8 (gate_up 221.6 us in session 20).

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

INT4_GROUP = 128  # the int4 kernel's group: one group a K step, its two half-group nibble planes side by side


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedTiles:
    """Static tile sizes: each compute warpgroup's ``tile_m x tile_n``, the K step (int8 64: one 128-byte swizzle
    row of bfloat16 x, or 128 with regs; int4 one group of 128), the slots in flight, and the planar snake's width
    (output tiles walked along N first). regs: the widened weight stays in registers and is wgmma's A operand, x
    its B operand, the accumulator the tile's transpose (K-major weights; no shared-memory bfloat16 buffers, no
    widened stores)."""
    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    snake_width: int = 8
    regs: bool = False  # the widened weight stays in registers as wgmma's A operand (K-major weights only)


def int8_matmul_reference(x, wq, sw, *, k_major: bool = False, out_dtype=jnp.bfloat16):
    """x [M, K] float, wq [K, N] int8 ([N, K] if k_major), sw [N] float32 -> [M, N] out_dtype (float32 math)."""
    w = (wq.T if k_major else wq).astype(jnp.float32)
    y = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return (y * sw[None, :].astype(jnp.float32)).astype(out_dtype)


def tiles_of(cfg, fmt: str = "int8") -> MixedTiles:
    """The tiles a ``TileConfig(kernel="mgpu")`` names for a weight-only int8 / int4 weight: block_m / block_n each
    compute warpgroup's tile, num_stages the slots in flight (int4: one group of 128 a K step), weight_regs
    ``regs`` (int8 with it: block_k 128 is a K step of 128, else 64)."""
    tile_k = INT4_GROUP if fmt != "int8" else 128 if cfg.weight_regs and cfg.block_k == 128 else 64
    return MixedTiles(tile_m=cfg.block_m, tile_n=cfg.block_n, tile_k=tile_k, stages=cfg.num_stages,
                      regs=cfg.weight_regs)


def smem_bytes(t: MixedTiles, out_dtype=jnp.bfloat16, fmt: str = "int8") -> int:
    """Shared memory the kernel takes: the slots in flight (x and both warpgroups' packed weight; int4 also a row
    of scales and offsets), each warpgroup's two bfloat16 weight buffers, the epilogue's pieces and the
    pipeline's barriers."""
    cta_n = 2 * t.tile_n
    weight = cta_n * t.tile_k if fmt == "int8" else cta_n * t.tile_k // 2 + 2 * cta_n * 2  # int4: + 2 bf16 rows
    slots = t.stages * (t.tile_m * t.tile_k * 2 + weight)
    buffers = 0 if t.regs else 2 * 2 * t.tile_n * t.tile_k * 2
    return slots + buffers + mgpu_matmul.out_smem_bytes(out_dtype) + SLACK


def fit_stages(t: MixedTiles, out_dtype=jnp.bfloat16, fmt: str = "int8") -> MixedTiles:
    """The tiles with as many of the requested stages (at least 2) as fit in shared memory with this output."""
    return mgpu_matmul.fit_stages(t, functools.partial(smem_bytes, fmt=fmt), out_dtype)


def _tiles_ok(t: MixedTiles, fmt: str = "int8") -> bool:
    return (t.tile_m % 64 == 0 and t.tile_m <= 256 and t.tile_n in (64, 128)
            and (t.tile_k == INT4_GROUP if fmt != "int8" else t.tile_k == 64 or (t.regs and t.tile_k == 128))
            and t.stages >= 2)


def fits(n: int, k: int, tiles: MixedTiles, fmt: str = "int8") -> bool:
    """Whether the kernel takes N out features and K in features with these tiles (M is padded by the caller)."""
    return _tiles_ok(tiles, fmt) and n % (2 * tiles.tile_n) == 0 and k % tiles.tile_k == 0


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
    if tiles.regs and not k_major:
        raise ValueError("int8_matmul_mgpu: tiles with regs=True (the weight as wgmma's register operand) take a "
                         "K-major weight [N, K] only; got a [K, N] one (k_major=False)")
    _check_tiles("int8", m, n, k, tiles, out_dtype)


def _check_tiles(fmt: str, m: int, n: int, k: int, t: MixedTiles, out_dtype) -> None:
    name = f"{fmt}_matmul_mgpu"
    if not _tiles_ok(t, fmt):
        step = ("64 (one 128-byte swizzle of bfloat16; 128 with regs)" if fmt == "int8"
                else f"{INT4_GROUP} (one group a step)")
        raise ValueError(f"{name} tiles: tile_m a multiple of 64 up to 256, tile_n 64 or 128, tile_k {step}, "
                         f"stages >= 2; got {t}")
    mgpu_matmul.check_smem(name, t, functools.partial(smem_bytes, fmt=fmt), out_dtype)
    if m % t.tile_m or not fits(n, k, t, fmt):
        raise ValueError(f"{name} needs M % {t.tile_m}, N % {2 * t.tile_n} and K % {t.tile_k} == 0; got "
                         f"M={m}, N={n}, K={k} (pad M; pick tiles that divide N)")


def _weight_specs(fmt: str, k_major: bool, tiles: MixedTiles):
    """-> (BlockSpecs of the weight inputs, the axis of each along which the CTA's columns lie, the widened
    buffer's shape)."""
    tile_n, tile_k, cta_n = tiles.tile_n, tiles.tile_k, 2 * tiles.tile_n
    spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM, delay_release=1)
    if fmt == "int4":  # packed [N, K/2]: [cta_n, G/2] bytes a step; scale and offset rows [K/G, N]: [1, cta_n]
        specs = [spec((cta_n, tile_k // 2), lambda ki: (0, ki), transforms=mgpu_matmul.swizzle(tile_k // 2, 1)),
                 spec((1, cta_n), lambda ki: (ki, 0)), spec((1, cta_n), lambda ki: (ki, 0))]
        return specs, (0, 1, 1), (tile_n, tile_k)
    if k_major:  # [cta_n, tile_k] int8 tiles; each warpgroup widens its [tile_n, tile_k] rows
        return [spec((cta_n, tile_k), lambda ki: (0, ki), transforms=mgpu_matmul.swizzle(tile_k, 1))], (0,), \
            (tile_n, tile_k)
    # [tile_k, cta_n] int8 tiles; each warpgroup widens its [tile_k, tile_n] columns
    return [spec((tile_k, cta_n), lambda ki: (ki, 0), transforms=mgpu_matmul.swizzle(tile_n, 1))], (1,), \
        (tile_k, tile_n)


def _widened(fmt: str, k_major: bool, tile_n: int, w_smems, wg, *, interpret: bool = False) -> list:
    """This warpgroup's slice of the step's weight tile as bfloat16 register arrays: eight bytes a thread in one
    load (the ``WGMMA_UPCAST_2X`` layout), widened in registers. int8: one ``[tile_n, tile_k]`` array (``[tile_k,
    tile_n]`` for a ``[K, N]`` weight); int4: the group's two halves along K, ``[tile_n, 64]`` each (each byte's low
    and high nibbles), ``w = u * scale + offset`` (offset = -zero * scale) in bfloat16, one rounding of the scaled
    weight as the Triton kernels' ``scale_in_bf16``. interpret: plain loads (the Mosaic GPU interpreter has no
    register layouts), for checking the arithmetic on the CPU."""
    rows = pl.ds(wg * tile_n, tile_n)
    layout = plgpu.Layout.WGMMA_UPCAST_2X

    def load(ref, layout, optimized=True):
        return ref[...] if interpret else plgpu.load(ref, (), layout=layout, optimized=optimized)

    if fmt == "int8":
        return [load(w_smems[0].at[rows] if k_major else w_smems[0].at[:, rows], layout).astype(jnp.bfloat16)]
    packed_smem, scale_smem, offset_smem = w_smems
    u = load(packed_smem.at[rows], layout)  # [tile_n, G/2] uint8
    s, o = (load(r.at[0, rows], layout.reduce(1), optimized=False) for r in (scale_smem, offset_smem))
    # Mosaic GPU has no 8-bit arithmetic but bitwise ops, and widens *signed* int8 to bfloat16 in four PTX
    # instructions a pair (unsigned bytes take the slow int-to-float converts): the low nibble is a non-negative
    # int8; the high one stays in place (16 h), its top bit flipped so that the signed byte is 16 h - 128 (exact in
    # bfloat16, as 16 h), and meets s / 16
    s_lo, s_hi, o = (lax.broadcast_in_dim(v, u.shape, [0]) for v in (s, s * 0.0625, o))
    lo = lax.bitcast_convert_type(u & 0x0F, jnp.int8).astype(jnp.bfloat16)
    hi = lax.bitcast_convert_type((u & 0xF0) ^ 0x80, jnp.int8).astype(jnp.bfloat16) + 128
    return [lo * s_lo + o, hi * s_hi + o]


def _widen(fmt: str, k_major: bool, tile_n: int, wb, w_smems, wg, *, interpret: bool = False) -> None:
    """``_widened`` stored into the shared-memory buffer ``wb`` (int4: the two halves side by side along K), as
    16-byte vectors."""
    parts = _widened(fmt, k_major, tile_n, w_smems, wg, interpret=interpret)
    if len(parts) == 1:
        wb[...] = parts[0]
        return
    half = parts[0].shape[1]
    for i, part in enumerate(parts):
        wb.at[:, pl.ds(i * half, half)][...] = part


def _kernel(x_gmem, *refs, tiles: MixedTiles, fmt: str, k_major: bool):
    *w_gmems, sw_gmem, out_gmem = refs if fmt == "int8" else (*refs[:-1], None, refs[-1])
    tile_m, tile_n, tile_k, regs = tiles.tile_m, tiles.tile_n, tiles.tile_k, tiles.regs
    w_specs, column_axes, wb_shape = _weight_specs(fmt, k_major, tiles)
    x_spec = plgpu.BlockSpec((tile_m, tile_k), lambda ki: (0, ki), memory_space=plgpu.SMEM, delay_release=1,
                             transforms=mgpu_matmul.swizzle(tile_k * 2, 2))

    def mma_regs(wg, scratch, idxs, x_smem, *refs):
        # acc^T [tile_n, tile_m] += W [tile_n, tile_k] (registers) @ x^T [tile_k, tile_m] (shared memory), waited
        # for at once: a wgmma still reading its register operand while the next step widened into registers gave
        # wrong results on the H100 (session 21: the register allocator does not see the asynchronous read), so the
        # overlap comes from the other warpgroup only
        *w_smems, acc_ref = refs
        parts = _widened(fmt, True, tile_n, w_smems, wg)
        step = tile_k // len(parts)
        for i, part in enumerate(parts):
            plgpu.wgmma(acc_ref, plgpu.layout_cast(part, plgpu.Layout.WGMMA), x_smem.at[:, pl.ds(i * step, step)].T)
        plgpu.wgmma_wait(0)
        return acc_ref

    def mma(wg, scratch, idxs, x_smem, *refs):
        # Widen step ki's weight slice while step ki - 1's wgmma runs (it reads the other buffer); the pipeline
        # releases a step's slots one step late (delay_release), after wgmma_wait(1) saw it done.
        *w_smems, acc_ref = refs
        (ki,) = idxs
        wb = scratch["wb_smem"].at[wg, lax.rem(ki, 2)]
        _widen(fmt, k_major, tile_n, wb, w_smems, wg)
        plgpu.commit_smem()
        plgpu.wgmma(acc_ref, x_smem, wb.T if k_major else wb)
        plgpu.wgmma_wait(1)
        return acc_ref

    def epilogue(acc, wg, mi, wg_n0, out_smem):
        # acc [tile_m, tile_n], or its transpose with regs: each EPI x EPI piece is stored as its transpose
        n_axis = 0 if regs else 1
        for en in range(tile_n // EPI):
            if sw_gmem is not None:  # int8: the per-channel scale
                sw = plgpu.load(sw_gmem.at[pl.ds(wg_n0 + en * EPI, EPI)], (),
                                layout=plgpu.Layout.WGMMA.reduce(1 - n_axis), optimized=False)
            for em in range(tile_m // EPI):
                ms, ns = slice(em * EPI, (em + 1) * EPI), slice(en * EPI, (en + 1) * EPI)
                part = acc[ns, ms] if regs else acc[ms, ns]
                if sw_gmem is not None:
                    part = part * lax.broadcast_in_dim(sw, part.shape, [n_axis])
                mgpu_matmul.store_piece(
                    part, out_smem, wg, (en * (tile_m // EPI) + em) % 2,
                    out_gmem.at[pl.ds(mi * tile_m + em * EPI, EPI), pl.ds(wg_n0 + en * EPI, EPI)], transposed=regs)

    mgpu_matmul.persistent_matmul(
        x_gmem, w_gmems, out_gmem, tiles=tiles, in_specs=[x_spec, *w_specs], acc_dtype=jnp.float32,
        mma=mma_regs if regs else mma, acc_transposed=regs,
        columns=lambda i, g, n_slice: g.at[n_slice] if column_axes[i] == 0 else g.at[:, n_slice],
        epilogue=epilogue, scratch={} if regs else dict(  # the shared-memory path's two widened buffers
            wb_smem=plgpu.SMEM((2, 2, *wb_shape), jnp.bfloat16, transforms=mgpu_matmul.swizzle(wb_shape[1] * 2, 2))))


@functools.partial(jax.jit, static_argnames=("tiles", "k_major", "out_dtype", "num_sms"))
def _int8_matmul_mgpu(x, wq, sw, *, tiles: MixedTiles, k_major: bool, out_dtype, num_sms: int):
    kernel = functools.partial(_kernel, tiles=tiles, fmt="int8", k_major=k_major)
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


def int4_matmul_reference(x, qweight, *, out_dtype=jnp.bfloat16):
    """x [M, K] float times a K-major ``Int4Weight`` -> [M, N] out_dtype (the float32 dot of the dequantized
    weight)."""
    y = jnp.dot(x.astype(jnp.float32), qweight.dequantize(jnp.float32), precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype)


def check_int4_inputs(x, qweight, tiles: MixedTiles, out_dtype=jnp.bfloat16) -> None:
    """ValueError naming what the int4 kernel does not take."""
    from .quant_formats import Int4Weight

    if not (isinstance(qweight, Int4Weight) and qweight.k_major and qweight.group == INT4_GROUP):
        raise ValueError(f"int4_matmul_mgpu takes a K-major Int4Weight with group {INT4_GROUP} (packed [N, K/2]); got "
                         f"{type(qweight).__name__} {getattr(qweight, 'name', '')}")
    if x.dtype != jnp.bfloat16 or x.ndim != 2 or x.shape[1] != qweight.in_features:
        raise ValueError(f"int4_matmul_mgpu takes x [M, K={qweight.in_features}] bfloat16; got {x.dtype} {x.shape}")
    _check_tiles("int4", x.shape[0], qweight.out_features, qweight.in_features, tiles, out_dtype)


@functools.partial(jax.jit, static_argnames=("tiles", "out_dtype", "num_sms"))
def _int4_matmul_mgpu(x, qweight, *, tiles: MixedTiles, out_dtype, num_sms: int):
    kernel = functools.partial(_kernel, tiles=tiles, fmt="int4", k_major=True)
    scale = qweight.scale.astype(jnp.float32)  # [N, K/G]
    zero = 8.0 if qweight.zero is None else qweight.zero.astype(jnp.float32)
    scale_t, offset_t = scale.T.astype(jnp.bfloat16), (-zero * scale).T.astype(jnp.bfloat16)  # [K/G, N] rows

    def int4_matmul_mgpu_kernel(x_gmem, packed_gmem, scale_gmem, offset_gmem, out_gmem):  # the name in profiles
        kernel(x_gmem, packed_gmem, scale_gmem, offset_gmem, out_gmem)

    return mgpu_matmul.launch(int4_matmul_mgpu_kernel, (x.shape[0], qweight.out_features), out_dtype, num_sms,
                              x, qweight.packed, scale_t, offset_t)


INT4_TILES = MixedTiles(tile_n=64, tile_k=INT4_GROUP, stages=3)


def int4_matmul_mgpu(x, qweight, *, tiles: MixedTiles = INT4_TILES, out_dtype=jnp.bfloat16,
                     num_sms: int | None = None):
    """x [M, K] bfloat16 times a K-major group-128 ``Int4Weight`` -> [M, N] out_dtype on a Hopper GPU: each K step
    widens one group (its two half-group nibble planes, ``w = (u - zero) * scale`` rounded once to bfloat16) and
    runs one bf16 wgmma per half (``regs``) or one over both. Taken where the H100 tile table names it (M >= 128)."""
    check_int4_inputs(x, qweight, tiles, out_dtype)
    tiles_total = (x.shape[0] // tiles.tile_m) * (qweight.out_features // (2 * tiles.tile_n))
    return _int4_matmul_mgpu(x, qweight, tiles=tiles, out_dtype=jnp.dtype(out_dtype),
                             num_sms=mgpu_matmul.num_programs(num_sms, tiles_total))
