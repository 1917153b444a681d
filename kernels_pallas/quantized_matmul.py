"""``quantized_matmul(x, qweight)``: ``y[..., O] = x[..., I] @ dequant(qweight)[I, O] (+ bias)``, one entry point.

Formats (layout, packing, scales, zero points) are defined in ``quant_formats.py``. Dispatch by platform:

* GPU: the Pallas kernels of ``qmatmul_gpu.py`` (Triton lowering; ``gemv`` for one row, ``dot`` tiles
  otherwise), tile config from the tuned table (``qmatmul_tiles.lookup``); where the table says XLA's
  dequantize-then-dot was faster for that shape, that path (``kernel="xla"``); for ``Int8Weight`` where it
  says XLA's int8 x int8 dot of two-digit activations was faster (``kernel="xla_split"``,
  ``int8_split_matmul``), that path (the H100 table of 2026-11-26 picks it for most K-major int8 problems at
  M <= 32, the Pallas K-major gemv for qkv / o at M = 1, and the split path for some [K, N] shapes at M = 8-32).
  float32 activations take the XLA dequantize-then-dot path (also where the table says ``xla_split``).
  Where the table says ``kernel="mgpu"`` (Hopper, M >= 128) the Mosaic GPU wgmma kernels serve W8A8
  (``qmatmul_w8a8_mgpu.py``: int8 x int8 -> int32), weight-only ``Int8Weight`` and K-major group-128
  ``Int4Weight`` with bf16 activations (``qmatmul_mixed_mgpu.py``: the weight widened to bf16, bf16 wgmma; with
  ``weight_regs`` the widened K-major weight is wgmma's register operand). The Triton
  lowering (deprecated since jax 0.11) serves the rest. Measured speeds and gaps:
  experiments/results/qmatmul_h100_notes.md.
* TPU: the Pallas Mosaic TPU kernel of ``qmatmul_tpu.py`` (never run on a TPU here).
* CPU: ``quantized_matmul_reference``; ``interpret=True`` runs a Pallas kernel in interpret mode instead.
* K-major ``Int8Weight`` (``k_major=True``, ``qweight[N, K]``): on the GPU the table entry of format
  ``"int8_kmajor"`` picks the Pallas gemv / dot over ``[block_n, block_k]`` tiles or an XLA path
  (``qmatmul_tiles.default_config`` names ``xla_split`` while none is tuned), or at one row the integer-dot GEMV of
  ``qmatmul_dp4a.py`` (``kernel="dp4a"``, x as digit planes). K-major ``Int4Weight``
  (``packed[N, K/2]``): at one row the integer-dot GEMV of ``qmatmul_dp4a.py`` (``kernel="gemv"``), else the
  Pallas dot over ``[block_n, G/2]`` planes. The Mosaic TPU kernel takes ``[K, N]`` only, so on the TPU the XLA
  paths serve K-major weights (int8: ``xla_split`` for bf16/f16 x with K <= ``SPLIT_MAX_K``, else ``xla``);
  forcing ``impl="pallas_tpu"`` on one raises.

``impl`` forces a path: ``"pallas_gpu"``, ``"pallas_tpu"``, ``"xla"``, ``"xla_split"`` (``Int8Weight`` only, any
platform), ``"reference"`` (``"auto"`` = above).
Every path is checked against ``quantized_matmul_reference`` (float32 dequantize-then-dot at highest
precision; W8A8: the same per-token int8 activation quantization and an exact int32 product).

W8A8 static activations: ``act_scale`` (a float32 scalar or ``[1]``, e.g. from calibration, see
``autoglm_jax.quant``) replaces the dynamic per-token scale: ``xq = clip(round(x / act_scale), -127, 127)``
and every row gets ``sx[m] = act_scale``; the kernels take it as that per-row scale, unchanged. Dynamic
per-token scales on the Pallas GPU path come from ``quantize_rows.py`` (one pass over x, same values as
``quantize_activations``; on the H100 13.6 against XLA's 17.4 us at x[512, 13696],
experiments/results/qmatmul_diag/diag_w8a8_act_quant_h100.json).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from . import qmatmul_tiles
from .act_digits import SPLIT_STEPS, ActDigits
from .qmatmul_tiles import TileConfig
from .quant_formats import (FORMAT_TYPES, Int4Weight, Int8Weight, QuantFormatError, W8A8Weight,
                            quantize_activations)

IMPLS = ("auto", "pallas_gpu", "pallas_tpu", "xla", "xla_split", "reference")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check(cond: bool, msg: str):
    if not cond:
        raise QuantFormatError(msg)


def validate_inputs(x, qweight, bias=None, out_dtype=None, act_scale=None):
    """Raise ``QuantFormatError`` (a ValueError) naming what is wrong, before any device work."""
    _check(isinstance(qweight, FORMAT_TYPES),
           f"qweight must be one of {[t.__name__ for t in FORMAT_TYPES]}; got {type(qweight).__name__}")
    qweight.validate()
    _check(hasattr(x, "shape") and hasattr(x, "dtype"), f"x must be an array; got {type(x).__name__}")
    _check(jnp.dtype(x.dtype) in FLOAT_DTYPES,
           f"x must be float32, bfloat16 or float16; got {x.dtype} (quantize weights, not activations: "
           "W8A8 quantizes x itself)")
    _check(x.ndim >= 1 and x.shape[-1] == qweight.in_features,
           f"x[..., I] must have I = {qweight.in_features} (the weight's in_features); got x.shape={x.shape}")
    if bias is not None:
        _check(bias.shape == (qweight.out_features,) and jnp.issubdtype(bias.dtype, jnp.floating),
               f"bias must be float [O={qweight.out_features}]; got {bias.dtype} {bias.shape}")
    if out_dtype is not None:
        _check(jnp.dtype(out_dtype) in FLOAT_DTYPES, f"out_dtype must be a float dtype; got {out_dtype}")
    if act_scale is not None:
        _check(isinstance(qweight, W8A8Weight),
               f"act_scale (a static activation scale) is for W8A8 weights only; got {type(qweight).__name__}")
        _check(hasattr(act_scale, "shape") and tuple(act_scale.shape) in ((), (1,))
               and jnp.issubdtype(act_scale.dtype, jnp.floating),
               f"act_scale must be a float scalar or [1] array; got {getattr(act_scale, 'dtype', type(act_scale))} "
               f"{getattr(act_scale, 'shape', '')}")


def quantize_x(x2, act_scale=None):
    """W8A8 activations ``x2[M, I]`` -> (``xq[M, I] int8``, ``sx[M, 1] float32``): per-token dynamic scales, or
    the one static ``act_scale`` for every row (values beyond ``127 * act_scale`` saturate)."""
    if act_scale is None:
        return quantize_activations(x2)
    s = jnp.asarray(act_scale, jnp.float32).reshape(())
    xq = jnp.clip(jnp.round(x2.astype(jnp.float32) / s), -127, 127).astype(jnp.int8)
    return xq, jnp.full((x2.shape[0], 1), s, jnp.float32)


def _finish(y, bias, out_dtype, lead_shape):
    y = y.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype).reshape(*lead_shape, y.shape[-1])


def quantized_matmul_reference(x, qweight, *, bias=None, out_dtype=None, act_scale=None):
    """Plain jnp: float32 ``x @ qweight.dequantize()``; W8A8: int8 x (per-token dynamic scales, or the static
    ``act_scale``), exact int32 product."""
    validate_inputs(x, qweight, bias, out_dtype, act_scale)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(qweight, W8A8Weight):
        xq, sx = quantize_x(x2, act_scale)
        acc = jnp.dot(xq.astype(jnp.int32), qweight.qweight.astype(jnp.int32).T)
        y = acc.astype(jnp.float32) * sx * qweight.scale.astype(jnp.float32)[None, :]
    else:
        y = jnp.dot(x2.astype(jnp.float32), qweight.dequantize(jnp.float32), precision=lax.Precision.HIGHEST)
    return _finish(y, bias, out_dtype, x.shape[:-1])


def xla_quantized_matmul(x2, qweight, act_scale=None):
    """XLA's dequantize-then-dot in the activation dtype (the baseline, and the fallback) -> [M, N] float32."""
    if isinstance(qweight, W8A8Weight):
        xq, sx = quantize_x(x2, act_scale)
        acc = lax.dot_general(xq, qweight.qweight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * sx * qweight.scale.astype(jnp.float32)[None, :]
    if isinstance(qweight, Int4Weight):
        w = qweight.dequantize(x2.dtype)
        return jnp.dot(x2, w, preferred_element_type=jnp.float32)
    y = lax.dot_general(x2, qweight.qweight.astype(x2.dtype), (((1,), (_k_dim(qweight),)), ((), ())),
                        preferred_element_type=jnp.float32)
    return y * qweight.scale.astype(jnp.float32)[None, :]


def _k_dim(qweight: Int8Weight) -> int:
    """The contracting (K) dimension of an int8 ``qweight``: 0 for ``[K, N]``, 1 for K-major ``[N, K]``."""
    return 1 if qweight.k_major else 0


SPLIT_KERNEL_MAX_K = 8192  # the GPU dispatch's xla_split writes its digits in one Pallas launch up to this K
# (H100, session 22, qmatmul_diag/s22_act_prep/: 0.4-1.5 us faster at K = 4096, M <= 32; 0.4 us slower at 13696, M=1)
SPLIT_MAX_K = (2**31 - 1) // (127 * 128)  # 132104: the hi-digit int32 sum |sum_k hi * q| <= K * 127 * 128


def split_digits(xf, axis: int):
    """Per-slice fixed point of float32 ``xf`` along ``axis``: (step, int8 digits [hi; lo] stacked on axis 0)."""
    step = jnp.maximum(jnp.max(jnp.abs(xf), axis=axis, keepdims=True), 1e-30) / SPLIT_STEPS
    xs = jnp.clip(jnp.round(xf / step), -SPLIT_STEPS, SPLIT_STEPS)
    hi = jnp.round(xs / 128.0)
    return step, jnp.concatenate([hi, xs - 128.0 * hi]).astype(jnp.int8)


def int8_split_matmul(x2, qweight: Int8Weight, *, k_blocks: int = 1, prep: str = "xla", interpret: bool = False,
                      x_digits: ActDigits | None = None):
    """Weight-only int8 through XLA's int8 x int8 -> int32 dot: ``x2[M, K]`` (float) -> float32 ``[M, N]``.

    Representation: per row m, ``step[m] = absmax(x2[m]) / (127 * 128)`` (absmax floored at 1e-30, so zero
    rows give zeros), ``xs = round(x / step)``, an integer in ``[-16256, 16256]``, written as two int8 digits
    ``xs = 128 * hi + lo`` with ``hi = round(xs / 128)`` (``|hi| <= 127``) and ``lo = xs - 128 * hi``
    (``|lo| <= 64``). One int8 dot of the stacked digits ``[2M, K]`` with ``qweight [K, N]`` (or K-major
    ``[N, K]``, contracting its dim 1) gives exact int32 sums ``Y``; ``y = (128 * Y[:M] + Y[M:]) * step * scale``
    in float32.

    Error: the only approximation is the activation's fixed point, ``|x - xs * step| <= step / 2 =
    absmax / 32512`` per element (15 bits of fixed point per row; bf16 rounds each element to 8 significant
    bits, error up to 2**-9 to 2**-8 of its magnitude, so the elements near the row's absmax, which dominate the
    dot, are carried 64 to 128 times more precisely than bf16 would; elements ~100x below the absmax about as
    precisely as bf16, smaller ones less). Hence per output
    ``|y - x @ dequant(w)| <= step / 2 * sum_k |q[k, n]| * scale[n]`` plus float32 rounding of the
    recombination (a few ulps of ``sum_k |x q| * step * scale``). The int32 sums are exact while
    ``K * 127 * 128 < 2**31`` (``|hi| <= 127``, ``|q| <= 128``; the lo digits are half that), i.e.
    ``K <= SPLIT_MAX_K = 132104``; a larger K raises ``QuantFormatError``. Non-finite rows give non-finite
    outputs (their step is inf or NaN).

    ``k_blocks = b > 1`` takes the step per row *and* per K block (b equal blocks of K / b): the dot is batched
    over the blocks, each block's int32 sums are scaled by its own step, and the float32 results summed over the
    blocks. Under tensor parallelism a row-parallel weight (o_proj, down_proj) has K split over the devices; with
    one block per device each block's absmax is local, where one step per row would need a cross-device max
    before every such matmul (``sharding.partition.set_tp_layout`` sets it to the tensor degree). The error bound
    above holds per block, with the block's absmax.

    ``prep="kernel"`` (one block only; the GPU dispatch's choice) writes the step and digits in one Pallas launch,
    ``quantize_rows.split_rows`` (the correctly rounded quotient x / step, which XLA's fusions may miss by one step on
    a few elements); ``"xla"`` leaves them to XLA's fusions. ``x_digits`` (one block only): the digits already
    written by x's producer (``act_digits``, layout 0), used instead of either prep.
    """
    _check(isinstance(qweight, Int8Weight),
           f"the xla_split path is for Int8Weight (weight-only int8) only; got {type(qweight).__name__}")
    k = qweight.in_features
    _check(k <= SPLIT_MAX_K, f"the xla_split path needs K <= {SPLIT_MAX_K} (int32 sums of K products up to "
                             f"127 * 128 must not overflow); got K={k}")
    _check(isinstance(k_blocks, int) and k_blocks >= 1 and k % k_blocks == 0,
           f"k_blocks={k_blocks!r} must be a positive int dividing K={k}")
    m, n, b = x2.shape[0], qweight.out_features, k_blocks
    scale = qweight.scale.astype(jnp.float32)[None, :]
    _check(prep in ("xla", "kernel"), f"prep must be 'xla' or 'kernel'; got {prep!r}")
    if b == 1:  # the plain [M, K] form (no block axis), so XLA sees an ordinary int8 dot
        if x_digits is not None:
            x_digits.check(m, k, 0)
            step, digits = x_digits.step, x_digits.digits
        elif prep == "kernel":
            from .quantize_rows import split_rows
            step, digits = split_rows(x2, steps=SPLIT_STEPS, interpret=interpret)
        else:
            step, digits = split_digits(x2.astype(jnp.float32), axis=1)  # [M, 1], [2M, K]
        acc = lax.dot_general(digits, qweight.qweight, (((1,), (_k_dim(qweight),)), ((), ())),
                              preferred_element_type=jnp.int32).astype(jnp.float32)
        return (128.0 * acc[:m] + acc[m:]) * step * scale
    step, digits = split_digits(x2.astype(jnp.float32).reshape(m, b, k // b), axis=2)  # [M, b, 1], [2M, b, K/b]
    if qweight.k_major:  # [N, K] -> [N, b, K/b]: contract K/b, batch over b
        w, dims = qweight.qweight.reshape(n, b, k // b), (((2,), (2,)), ((1,), (1,)))
    else:  # [K, N] -> [b, K/b, N]
        w, dims = qweight.qweight.reshape(b, k // b, n), (((2,), (1,)), ((1,), (0,)))
    acc = lax.dot_general(digits, w, dims, preferred_element_type=jnp.int32).astype(jnp.float32)  # [b, 2M, N]
    y = (128.0 * acc[:, :m] + acc[:, m:]) * jnp.transpose(step, (1, 0, 2))  # [b, M, N]
    return jnp.sum(y, axis=0) * scale


def fit_config(cfg: TileConfig, qweight, m: int, *, wgmma: bool = True, x_dtype=jnp.bfloat16) -> TileConfig:
    """Adapt a (tuned or default) config to this problem: block_k divides K (int4: a multiple of the group, or a
    power-of-two part of one down to 32), split_k at most the number of K steps, block_m not far above M, W8A8
    never on the gemv kernel; the K-major int4 GEMV (``qmatmul_dp4a``): whole groups a step, at most K's groups
    rounded up to a power of two, only non-empty splits of K's steps, and a tile that ``qmatmul_dp4a.tile_fits``
    (more groups a step, then fewer warps, then up to 4 rows; else the dot tiles)."""
    k = qweight.in_features
    group = qweight.group if isinstance(qweight, Int4Weight) else 16
    if isinstance(qweight, Int4Weight) and cfg.block_k < group:  # part of a group a step (at least 32 rows)
        bk = max(cfg.block_k, 32)
    else:
        bk = max(cfg.block_k, group)
        while k % bk and bk > group:
            bk //= 2
    kernel, bm = cfg.kernel, cfg.block_m
    from .qmatmul_dp4a import planes_group
    if kernel == "dp4a" and not (isinstance(qweight, Int8Weight) and m == 1 and planes_group(qweight)):
        kernel = "gemv"  # a K-major Int4Weight's integer-dot GEMV is "gemv"; elsewhere the FMA GEMV (or dot tiles)
        cfg = dataclasses.replace(cfg, kernel=kernel)
    if kernel == "mgpu":  # wgmma (not interpret mode: it has no wgmma) and tiles that divide N and K
        from . import qmatmul_mixed_mgpu, qmatmul_w8a8_mgpu
        if wgmma and isinstance(qweight, W8A8Weight):
            if qmatmul_w8a8_mgpu.fits(qweight.out_features, k, qmatmul_w8a8_mgpu.tiles_of(cfg)):
                return dataclasses.replace(cfg, block_k=128, split_k=1, unroll=0)
        elif wgmma and isinstance(qweight, Int8Weight) and x_dtype == jnp.bfloat16:
            tiles = qmatmul_mixed_mgpu.tiles_of(cfg)
            if qmatmul_mixed_mgpu.fits(qweight.out_features, k, tiles) and (qweight.k_major or not tiles.regs):
                return dataclasses.replace(cfg, block_k=tiles.tile_k, split_k=1, unroll=0)
        elif (wgmma and isinstance(qweight, Int4Weight) and qweight.k_major and x_dtype == jnp.bfloat16
              and qweight.group == qmatmul_mixed_mgpu.INT4_GROUP):
            tiles = qmatmul_mixed_mgpu.tiles_of(cfg, "int4")
            if qmatmul_mixed_mgpu.fits(qweight.out_features, k, tiles, "int4"):
                return dataclasses.replace(cfg, block_k=tiles.tile_k, split_k=1, unroll=0)
        kernel, bm = "dot", 64  # else the dot tiles
        cfg = dataclasses.replace(cfg, weight_regs=False)
    if kernel == "gemv" and (m != 1 or isinstance(qweight, W8A8Weight)):
        kernel, bm = "dot", 16
    if kernel == "dp4a" or (kernel == "gemv" and isinstance(qweight, Int4Weight) and qweight.k_major):
        from .qmatmul_dp4a import dp4a_splits, tile_fits  # qmatmul_dp4a: whole group steps
        group = planes_group(qweight)
        kg = k // group
        ug_cap = 1 << max(kg - 1, 0).bit_length()
        bn, ug, warps = cfg.block_n, min(max(cfg.block_k // group, 1), ug_cap), cfg.num_warps
        while not tile_fits(bn, ug * group, warps):
            if ug < ug_cap:
                ug *= 2
            elif warps > 1:
                warps //= 2
            elif bn < 4:
                bn *= 2
            else:  # K too short for any tile that fits (a few groups): int4's dot tiles, int8's FMA GEMV serve it
                fmt, rows = ("int8", 1) if isinstance(qweight, Int8Weight) else (qweight.name, 16)
                return fit_config(qmatmul_tiles.default_config(fmt, rows), qweight, m)
        split = dp4a_splits(kg, ug, cfg.split_k)[0]
        return dataclasses.replace(cfg, kernel=kernel, block_m=1, block_n=bn, block_k=ug * group, split_k=split,
                                   num_warps=warps, unroll=0)
    if kernel == "dot":
        bm = max(16, min(bm, 1 << max(m - 1, 1).bit_length()))
    split = max(1, min(cfg.split_k, k // bk))
    unroll = cfg.unroll if (k // bk) % split == 0 else 0  # written out only with equal static steps per split
    return dataclasses.replace(cfg, kernel=kernel, block_m=bm, block_k=bk, split_k=split, unroll=unroll)


def fit_tpu_config(cfg: TileConfig, qweight) -> TileConfig | None:
    """Mosaic TPU tiles: block_m a multiple of 16, block_n and block_k multiples of 128 with block_k dividing K
    (the K grid axis sums every block, so no ragged K). None when K has no such block_k (use XLA)."""
    k = qweight.in_features
    bk = max(cfg.block_k, 128)
    while k % bk and bk > 128:
        bk //= 2
    if k % bk:
        return None
    return dataclasses.replace(cfg, kernel="dot", block_m=max(16, cfg.block_m), block_n=max(128, cfg.block_n),
                               block_k=bk, split_k=1)


def _pallas(x2, qweight, cfg: TileConfig, platform: str, interpret: bool, out_dtype, poison: bool,
            act_scale=None, x_digits=None):
    m = x2.shape[0]
    if isinstance(qweight, W8A8Weight) and act_scale is None and platform == "gpu":
        from .quantize_rows import quantize_rows  # one pass over x (XLA's form reads it twice)
        xk, sx = quantize_rows(x2, interpret=interpret)
    elif isinstance(qweight, W8A8Weight):
        xk, sx = quantize_x(x2, act_scale)
    else:
        xk, sx = x2, None
    mp = -(-m // cfg.block_m) * cfg.block_m
    if mp != m:
        xk = jnp.pad(xk, ((0, mp - m), (0, 0)))
        sx = None if sx is None else jnp.pad(sx, ((0, mp - m), (0, 0)), constant_values=1.0)
    n = qweight.out_features
    if cfg.kernel == "mgpu" and isinstance(qweight, Int8Weight):  # stages that fit with this output dtype
        from .qmatmul_mixed_mgpu import fit_stages, int8_matmul_mgpu, tiles_of
        y = int8_matmul_mgpu(xk, qweight.qweight, qweight.scale.astype(jnp.float32), k_major=qweight.k_major,
                             tiles=fit_stages(tiles_of(cfg), out_dtype), out_dtype=out_dtype)
    elif cfg.kernel == "mgpu" and isinstance(qweight, Int4Weight):
        from .qmatmul_mixed_mgpu import fit_stages, int4_matmul_mgpu, tiles_of
        y = int4_matmul_mgpu(xk, qweight, tiles=fit_stages(tiles_of(cfg, "int4"), out_dtype, "int4"),
                             out_dtype=out_dtype)
    elif cfg.kernel == "mgpu":
        from .qmatmul_w8a8_mgpu import fit_stages, tiles_of, w8a8_matmul_mgpu
        y = w8a8_matmul_mgpu(xk, sx[:, 0], qweight.qweight, qweight.scale.astype(jnp.float32),
                             tiles=fit_stages(tiles_of(cfg), out_dtype), out_dtype=out_dtype)
    elif platform == "tpu":
        from .qmatmul_tpu import tpu_qmatmul
        out = jnp.full((mp, n), jnp.nan, out_dtype) if poison else None
        y = tpu_qmatmul(xk, sx, qweight, out, cfg=cfg, out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    elif _takes_planes(qweight, cfg, m):
        from .qmatmul_dp4a import dp4a_gemv
        odt = jnp.dtype(out_dtype if cfg.split_k == 1 else jnp.float32)  # fit_config: split_k = non-empty splits
        out = jnp.full((cfg.split_k, n), jnp.nan, odt) if poison else None
        y = dp4a_gemv(xk, qweight, out, cfg=cfg, out_dtype=jnp.dtype(out_dtype), interpret=interpret,
                      x_digits=x_digits)
    else:
        from .qmatmul_gpu import gpu_qmatmul
        shape, dt = ((mp, n), out_dtype) if cfg.split_k == 1 else ((cfg.split_k, mp, n), jnp.float32)
        out = jnp.full(shape, jnp.nan, dt) if poison else None
        y = gpu_qmatmul(xk, sx, qweight, out, cfg=cfg, out_dtype=jnp.dtype(out_dtype), interpret=interpret)
        if cfg.split_k > 1:
            y = jnp.sum(y, axis=0)
    return y[:m]


def resolve_impl(impl: str, interpret: bool) -> str:
    """``impl`` with "auto" resolved by platform: the Pallas kernel of the GPU / TPU (interpreted anywhere with
    ``interpret``), else "reference"; any other impl as it is."""
    if impl != "auto":
        return impl
    platform = jax.default_backend()
    if interpret:
        return "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    return {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(platform, "reference")


def _route(x, qweight, impl: str, interpret: bool, config: TileConfig | None, k_blocks: int, given: bool = False):
    """The path a call takes: (impl, its tile config or None, the xla_split digits' prep). impl is one of
    "reference", "xla", "xla_split", "pallas_gpu" (config fitted to the problem), "pallas_tpu" (likewise);
    given: x's digits come from its producer (the table's ``given_config``, ``qmatmul_tiles.lookup``)."""
    platform = jax.default_backend()
    k_major = isinstance(qweight, (Int8Weight, Int4Weight)) and qweight.k_major
    impl = resolve_impl(impl, interpret)
    _check(impl != "xla_split" or isinstance(qweight, Int8Weight),
           f"impl='xla_split' is for Int8Weight (weight-only int8) only; got {type(qweight).__name__}")
    if impl == "reference":
        return impl, None, "xla"
    m, k = math.prod(x.shape[:-1]), qweight.in_features
    split_prep = "xla"  # the xla_split digits: XLA's fusions, or one Pallas launch where the GPU table chose the path
    if impl.startswith("pallas"):
        if config is None:
            dev = qmatmul_tiles.device_key(jax.devices()[0].device_kind)
            config = qmatmul_tiles.lookup(dev, qweight.name, m, k, qweight.out_features, given=given)
        # The split int8 dot where the table says so (Int8Weight, bf16/f16 x, K in bound); XLA's
        # dequantize-then-dot where the table says either XLA path, for float32 x, or where K has no 16-row tiles.
        f32 = x.dtype == jnp.float32
        # On the TPU a K-major weight takes an XLA path whatever the entry says: xla_split unless it says xla.
        tpu_k_major = k_major and impl == "pallas_tpu"
        if ((config.kernel == "xla_split" or (tpu_k_major and config.kernel != "xla"))
                and isinstance(qweight, Int8Weight) and not f32 and k <= SPLIT_MAX_K):
            gpu = impl == "pallas_gpu" and platform == "gpu" and not interpret
            split_prep = "kernel" if gpu and k_blocks == 1 and k <= SPLIT_KERNEL_MAX_K else "xla"
            impl = "xla_split"
        elif config.kernel in qmatmul_tiles.XLA_KERNELS or (f32 and not interpret) or k % 16 or tpu_k_major:
            impl = "xla"
    if impl == "pallas_tpu":
        config = fit_tpu_config(config, qweight)
        impl = "xla" if config is None else impl
    elif impl == "pallas_gpu":
        config = fit_config(config, qweight, m, wgmma=not interpret, x_dtype=x.dtype)
    return impl, (config if impl.startswith("pallas") else None), split_prep


def _takes_planes(qweight, cfg: TileConfig | None, m: int) -> bool:
    """The one-row integer-dot GEMV (``qmatmul_dp4a``) of a K-major Int4Weight ("gemv") or Int8Weight ("dp4a")
    serves this fitted config."""
    if cfg is None or m != 1 or cfg.kernel not in ("gemv", "dp4a"):
        return False
    from .qmatmul_dp4a import planes_group
    return planes_group(qweight) is not None and (cfg.kernel == "dp4a" or isinstance(qweight, Int4Weight))


def digits_layout(x, qweight, *, impl: str = "auto", interpret: bool = False, config: TileConfig | None = None,
                  k_blocks: int = 1, given: bool = False) -> int | None:
    """The ``ActDigits`` layout (``act_digits``) that ``quantized_matmul`` with these arguments would compute from x
    itself before its integer dot, so x's producer may write them instead: 0 (the ``xla_split`` int8 path, one K
    block), G (the GPU's one-row integer-dot GEMV: a K-major group-G ``Int4Weight``, or a K-major ``Int8Weight``
    with G = ``qmatmul_dp4a.INT8_GROUP``) or None (a path that takes x as it is). ``given``: the layout of the path
    a call takes when its producer writes them (a table entry's ``given_config``), which ``quantized_matmul`` then
    takes with them. ``x`` may be a ``jax.ShapeDtypeStruct``."""
    validate_inputs(x, qweight)
    _check(impl in IMPLS, f"impl={impl!r}; allowed: {IMPLS}")
    impl, cfg, _ = _route(x, qweight, impl, interpret, config, k_blocks, given)
    return _path_layout(impl, cfg, qweight, math.prod(x.shape[:-1]), k_blocks)


def _path_layout(impl: str, cfg: TileConfig | None, qweight, m: int, k_blocks: int) -> int | None:
    """The digits layout a routed path (``_route``) computes from x itself, or None."""
    if impl == "xla_split":
        return 0 if k_blocks == 1 else None
    if impl == "pallas_gpu" and _takes_planes(qweight, cfg, m):
        from .qmatmul_dp4a import planes_group
        return planes_group(qweight)
    return None


def quantized_matmul(x, qweight, *, bias=None, out_dtype=None, impl: str = "auto", interpret: bool = False,
                     config: TileConfig | None = None, act_scale=None, k_blocks: int = 1,
                     x_digits: ActDigits | None = None, _poison: bool = False):
    """``x[..., I]`` (float32/bfloat16/float16) times a quantized ``[I, O]`` weight -> ``[..., O]``.

    bias: optional ``[O]``; out_dtype defaults to x's dtype; impl: one of ``IMPLS``; interpret: run the
    Pallas kernel in interpret mode (CPU tests); config: a ``TileConfig`` overriding the tuned table;
    act_scale: W8A8 only, a static activation scale (float32 scalar or [1]) instead of per-token dynamic ones;
    k_blocks: the ``xla_split`` path's activation step per K block (``int8_split_matmul``; other paths ignore it);
    x_digits: x's fixed-point digits written by its producer (``act_digits.ActDigits``), taken by a path whose
    layout they are (``digits_layout``) instead of that path's own prep, ignored by the others;
    _poison (tests): the kernel writes into a NaN-filled output buffer, so unwritten elements show.
    A table (or ``config``) choice of ``kernel="xla_split"`` serves ``Int8Weight`` with bf16/f16 activations and
    K <= ``SPLIT_MAX_K``; elsewhere it falls back to ``"xla"``. ``impl="xla_split"`` forces it (Int8Weight only).
    A K-major ``Int8Weight`` / ``Int4Weight`` runs on the GPU kernels or the XLA paths (module docstring).
    """
    validate_inputs(x, qweight, bias, out_dtype, act_scale)
    _check(impl in IMPLS, f"impl={impl!r}; allowed: {IMPLS}")
    _check(config is None or isinstance(config, TileConfig), f"config must be a TileConfig; got {config!r}")
    _check(x_digits is None or isinstance(x_digits, ActDigits),
           f"x_digits must be an act_digits.ActDigits or None; got {type(x_digits).__name__}")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    k_major = isinstance(qweight, (Int8Weight, Int4Weight)) and qweight.k_major
    _check(not (k_major and impl == "pallas_tpu"),
           f"impl={impl!r}: the Mosaic TPU kernel takes weights stored [K, N] only; this {type(qweight).__name__} is "
           f"K-major (k_major=True). Allowed for it: 'auto', 'pallas_gpu', 'xla', "
           f"{'xla_split, ' if isinstance(qweight, Int8Weight) else ''}'reference' (or convert it with "
           f".with_layout(k_major=False))")
    m = math.prod(x.shape[:-1])
    route = _route(x, qweight, impl, interpret, config, k_blocks, x_digits is not None)
    if x_digits is not None and x_digits.group != _path_layout(route[0], route[1], qweight, m, k_blocks):
        x_digits = None  # not this path's layout: the path without given digits, with its own prep
        route = _route(x, qweight, impl, interpret, config, k_blocks)
    impl, cfg, split_prep = route
    if impl == "reference":
        return quantized_matmul_reference(x, qweight, bias=bias, out_dtype=out_dtype, act_scale=act_scale)
    x2 = x.reshape(-1, x.shape[-1])
    if impl == "xla":
        y = xla_quantized_matmul(x2, qweight, act_scale)
    elif impl == "xla_split":
        y = int8_split_matmul(x2, qweight, k_blocks=k_blocks, prep=split_prep, interpret=interpret,
                              x_digits=x_digits)
    else:
        y = _pallas(x2, qweight, cfg, "tpu" if impl == "pallas_tpu" else "gpu", interpret,
                    jnp.float32 if bias is not None else out_dtype, _poison, act_scale, x_digits)
    return _finish(y, bias, out_dtype, x.shape[:-1])
