"""Fake quantization (quantize -> dequantize in float) with a straight-through estimator, and the exact integer
quantization that matches it, for the formats of ``kernels_pallas.quant_formats``.

One affine grid for every format: ``q = clip(round(x / s) + z, qmin, qmax)``, ``fq(x) = (q - z) * s``.

========================  ========================  ==========  ==========================================
format                    scale ``s`` shape          ``z``       ``[qmin, qmax]``
========================  ========================  ==========  ==========================================
int8 / w8a8 weight        ``[1, O]`` (per channel)   0           [-127, 127]
int4 symmetric            ``[I/group, O]`` bfloat16  8           [0, 15]  (values -8..7, stored +8)
int4 asymmetric           ``[I/group, O]`` bfloat16  zero[G, O]  [0, 15]
W8A8 activation           ``[M, 1]`` or a scalar     0           [-127, 127]
========================  ========================  ==========  ==========================================

Weights are viewed as groups ``w[I, O] -> wg[G, n, O]`` (``G = 1, n = I`` per channel; ``G = I/group, n =
group`` for int4); scales and zero points are ``[G, O]``. ``weight_qparams`` turns a range ``(lo, hi)`` into
``(s, z)`` with the formulas of ``quant_formats.quantize_*`` (so an absmax/min-max range reproduces them bit
for bit), ``quantize_weight`` makes the real format object from ``(w, s, z)`` with the same rounding as
``fake_quant_weight``.

``fake_quant``'s gradient (``jax.custom_vjp``): ``dy/dx = 1`` where ``x`` is inside the range (``q`` not
clipped) and 0 outside; ``dy/ds`` is LSQ's (Esser et al. 2020): ``round(x/s) - x/s`` inside, ``qmin - z`` or
``qmax - z`` outside, times ``grad_scale`` (LSQ uses ``1 / sqrt(n * qmax)``), summed over the elements
sharing a scale. ``z`` gets no gradient (integer zero points stay fixed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.quant_formats import (INT4_GROUPS, Int4Weight, Int8Weight, QuantFormatError, W8A8Weight,
                                          check_k_major, pack_int4, resolve_k_major)

WEIGHT_FORMATS = ("int8", "int4", "w8a8")


def _unbroadcast(g: jax.Array, shape: tuple) -> jax.Array:
    """Sums ``g`` down to ``shape`` (the inverse of numpy broadcasting)."""
    extra = g.ndim - len(shape)
    g = jnp.sum(g, axis=tuple(range(extra))) if extra else g
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return jnp.sum(g, axis=axes, keepdims=True) if axes else g


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def fake_quant(x, scale, zero, qmin: int, qmax: int, grad_scale: float = 1.0):
    """``(clip(round(x / scale) + zero, qmin, qmax) - zero) * scale`` in x's dtype; scale, zero broadcast to x.

    Gradients: straight-through for x inside the range, zero outside; LSQ for scale (module docstring).
    """
    return _fq_fwd(x, scale, zero, qmin, qmax, grad_scale)[0]


def _fq_fwd(x, scale, zero, qmin, qmax, grad_scale):
    xf = x.astype(jnp.float32)
    s = scale.astype(jnp.float32)
    z = jax.lax.stop_gradient(jnp.asarray(zero, jnp.float32))
    v = xf / s
    r = jnp.round(v)
    q_unclipped = r + z
    q = jnp.clip(q_unclipped, qmin, qmax)
    y = ((q - z) * s).astype(x.dtype)
    return y, (v, r, q_unclipped, q, z, scale, jnp.asarray(zero), jnp.zeros((), x.dtype))


def _fq_bwd(qmin, qmax, grad_scale, res, g):
    v, r, q_unclipped, q, z, scale, zero, x_like = res
    g = g.astype(jnp.float32)
    inside = (q_unclipped >= qmin) & (q_unclipped <= qmax)
    dx = jnp.where(inside, g, 0.0)
    ds_elem = jnp.where(inside, r - v, q - z) * g * grad_scale
    ds = _unbroadcast(ds_elem, scale.shape).astype(scale.dtype)
    return dx.astype(x_like.dtype), ds, jnp.zeros_like(zero)


fake_quant.defvjp(lambda x, s, z, qmin, qmax, gs: _fq_fwd(x, s, z, qmin, qmax, gs), _fq_bwd)


# ---- weight formats ----------------------------------------------------------------------------------------

def check_weight_format(fmt: str, group: int, in_features: int | None = None) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise QuantFormatError(f"unknown quantization method {fmt!r}; allowed: {list(WEIGHT_FORMATS)}")
    if fmt == "int4":
        if group not in INT4_GROUPS:
            raise QuantFormatError(f"int4 group size {group} is not supported; allowed: {list(INT4_GROUPS)}")
        if in_features is not None and in_features % group:
            raise QuantFormatError(f"int4 group size {group} does not divide the layer's K = I = {in_features}")


def group_size(fmt: str, group: int, in_features: int) -> int:
    """Rows of w[I, O] sharing one scale: ``group`` for int4, all ``I`` (per channel) otherwise."""
    return group if fmt == "int4" else in_features


def grid(fmt: str) -> tuple[int, int]:
    """(qmin, qmax) of the stored integers."""
    return (0, 15) if fmt == "int4" else (-127, 127)


def group_view(w: jax.Array, fmt: str, group: int) -> jax.Array:
    """``w[..., I, O] -> [..., G, n, O]`` (leading axes, e.g. a stacked-layer [L], pass through)."""
    i, o = w.shape[-2:]
    n = group_size(fmt, group, i)
    return w.reshape(*w.shape[:-2], i // n, n, o)


def weight_range(wg: jax.Array, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Absmax (symmetric) or min/max (asymmetric) range per group: ``wg[..., G, n, O] -> lo, hi [..., G, O]``."""
    wf = wg.astype(jnp.float32)
    if symmetric:
        amax = jnp.max(jnp.abs(wf), axis=-2)
        return -amax, amax
    return jnp.min(wf, axis=-2), jnp.max(wf, axis=-2)


def weight_qparams(lo: jax.Array, hi: jax.Array, fmt: str, symmetric: bool = True) -> tuple[jax.Array, jax.Array]:
    """Range ``(lo, hi) [..., G, O]`` -> ``(scale, zero) [..., G, O]`` float32, the formulas of quant_formats.

    int8/w8a8: ``s = max(|lo|, |hi|) / 127``, z = 0. int4 symmetric: ``s = bf16(amax / 7)``, z = 8; asymmetric:
    ``s = bf16((hi' - lo') / 15)`` with ``lo' = min(lo, 0)``, ``hi' = max(hi, 0)``, ``z = clip(round(-lo' / s),
    0, 15)``. An all-zero group gets s = 1.
    """
    lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
    if fmt != "int4" or symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        if fmt != "int4":
            return jnp.where(amax > 0, amax / 127.0, 1.0), jnp.zeros_like(amax)
        s = jnp.where(amax > 0, amax / 7.0, 1.0).astype(jnp.bfloat16).astype(jnp.float32)
        return s, jnp.full_like(amax, 8.0)
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    s = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(jnp.bfloat16).astype(jnp.float32)
    return s, jnp.clip(jnp.round(-lo / s), 0, 15)


def fake_quant_weight(w: jax.Array, scale: jax.Array, zero: jax.Array, fmt: str, group: int = 128, *,
                      lsq: bool = False) -> jax.Array:
    """``w[..., I, O]`` through the format's grid with ``scale, zero [..., G, O]`` -> float ``[..., I, O]``.

    int4 scales are rounded to bfloat16 on the way (straight-through), as the stored format keeps them.
    lsq: scale the scale gradient by ``1 / sqrt(n * qmax)`` (LSQ's step-size gradient scale).
    """
    qmin, qmax = grid(fmt)
    wg = group_view(w, fmt, group)
    s = scale.astype(jnp.float32)
    if fmt == "int4":
        s = s + jax.lax.stop_gradient(s.astype(jnp.bfloat16).astype(jnp.float32) - s)
    s = jnp.maximum(s, 1e-12)
    gs = 1.0 / float(wg.shape[-2] * max(abs(qmin), qmax)) ** 0.5 if lsq else 1.0
    y = fake_quant(wg, s[..., None, :], zero[..., None, :], qmin, qmax, gs)
    return y.reshape(w.shape)


def quantize_weight(w: jax.Array, scale: jax.Array, zero: jax.Array, fmt: str, group: int = 128, *,
                    symmetric: bool = True, k_major: bool | str = False):
    """Float ``w[I, O]`` with ``scale, zero [G, O]`` -> ``Int8Weight`` | ``Int4Weight`` | ``W8A8Weight``, rounding as
    ``fake_quant_weight`` does (so ``result.dequantize() == fake_quant_weight(w, ...)``). k_major (int8 and
    int4): the weight is stored K-major, ``[O, I]`` (True, or ``"auto"``: ``resolve_k_major``)."""
    i, o = w.shape
    check_weight_format(fmt, group, i)
    check_k_major(fmt, k_major)
    qmin, qmax = grid(fmt)
    s = scale.astype(jnp.float32)
    if fmt == "int4":
        s = s.astype(jnp.bfloat16).astype(jnp.float32)
    wg = group_view(w.astype(jnp.float32), fmt, group)
    q = jnp.clip(jnp.round(wg / s[:, None, :]) + zero[:, None, :], qmin, qmax).reshape(i, o)
    if fmt == "int8":
        return Int8Weight(qweight=q.astype(jnp.int8), scale=s.reshape(o)).with_layout(resolve_k_major(k_major, i, o))
    if fmt == "w8a8":
        return W8A8Weight(qweight=q.astype(jnp.int8).T, scale=s.reshape(o))
    return Int4Weight(packed=pack_int4(q.astype(jnp.int32), group), scale=s.astype(jnp.bfloat16),
                      zero=None if symmetric else zero.astype(jnp.uint8), group=group).with_layout(
                          resolve_k_major(k_major, i, o, "int4"))


def fake_quant_activations(x: jax.Array, act_scale: jax.Array | None = None) -> jax.Array:
    """W8A8 activations ``x[..., I]`` through int8: per-token dynamic scales (``max|x| / 127``, no gradient) or
    the static ``act_scale``; straight-through gradient inside the range."""
    if act_scale is None:
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True)
        s = jax.lax.stop_gradient(jnp.where(amax > 0, amax / 127.0, 1.0))
    else:
        s = jnp.asarray(act_scale, jnp.float32).reshape(())
    return fake_quant(x, s, jnp.zeros((), jnp.float32), -127, 127, 1.0)
