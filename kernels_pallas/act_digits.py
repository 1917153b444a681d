"""An activation written as int8 digits by the kernel that produced it: ``ActDigits``.

The integer-dot paths of ``quantized_matmul`` take x in fixed point: per row m, ``step[m] = max(absmax(x[m]),
1e-30) / SPLIT_STEPS``, ``xs = clip(round(x / step), -SPLIT_STEPS, SPLIT_STEPS) = 128 hi + lo`` with
``hi = round(xs / 128)`` (``quantized_matmul.split_digits``: the only approximation of those paths). Two layouts:

* ``group == 0`` (the ``xla_split`` int8 path, ``quantized_matmul.int8_split_matmul``): ``digits [2M, K]`` int8,
  the hi digits in rows [0, M), the lo digits in rows [M, 2M); ``step [M, 1]`` float32; ``group_sums`` None.
* ``group == G`` (the int4 integer-dot GEMV, ``qmatmul_dp4a``; one row, M = 1): a step per group of G instead of
  per row (``step[g] = max(absmax(x over group g), 1e-30) / SPLIT_STEPS``, the same fixed point group by group: no
  row-wide max, so many programs can write them, and each group at least as precise as with the row's step);
  ``digits [4, K/G, G/2]`` int8, the hi and lo digits of the low half of each group, then those of its high half
  (k = g G + j and g G + G/2 + j for j < G/2: the halves a packed byte's two nibbles multiply); ``group_sums [K/G]``
  float32, ``X[g] = sum of xs over group g`` (in group g's steps); ``step [K/G]`` float32.

Each such path computes them from x itself, in one launch before its dot (``quantize_rows.split_rows``,
``qmatmul_dp4a.digit_planes_pallas``). In a decode step the kernel that produced x can write them as it writes x
(``add_rms_norm``, ``swiglu.swiglu_digits``), so the GEMV that follows needs no launch of its own (on the H100,
session 24: 1.5-3.2 us a GEMV at batch 1). ``quantized_matmul(..., x_digits=)`` takes them where its path uses
that layout and ignores them elsewhere; ``quantized_matmul.digits_layout`` says which layout a call's path would
use. The digits must be those of x exactly as the call gets it (the producer writes both from the same rounded
values).

``store_planes`` writes the planes from inside a Pallas kernel (Triton lowering; interpret mode on the CPU), and
``quantize_rows.split_step`` / ``store_split_digits`` the rows; the preps and the producers share them, so that
equal x gives equal digits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .quant_formats import QuantFormatError
from .quantize_rows import split_step, split_values

SPLIT_STEPS = 127 * 128  # per row, x is written as an integer xs in [-16256, 16256] steps of absmax / 16256
LAYOUTS = "0 (rows, the xla_split int8 path) or an int4 group size G (planes, the one-row integer-dot GEMV)"


@dataclasses.dataclass(frozen=True)
class ActDigits:
    step: jax.Array  # [M, 1] float32 (group 0) or [K/G] (planes: a step per group)
    digits: jax.Array  # [2M, K] int8 (group 0) or [4, K/G, G/2] (planes)
    group_sums: jax.Array | None  # None (group 0) or [K/G] float32
    group: int = dataclasses.field(default=0, metadata=dict(static=True))

    def check(self, m: int, k: int, group: int) -> None:
        """Raise ``QuantFormatError`` unless these are the digits of an x [m, k] in layout ``group``."""
        g = self.group
        if g != group:
            raise QuantFormatError(f"x_digits have layout group={g}; this path takes group={group} ({LAYOUTS})")
        if g == 0:
            want = {"step": (m, 1), "digits": (2 * m, k), "group_sums": None}
        else:
            want = {"step": (k // g,), "digits": (4, k // g, g // 2), "group_sums": (k // g,)}
        got = {"step": self.step.shape, "digits": self.digits.shape,
               "group_sums": None if self.group_sums is None else self.group_sums.shape}
        if got != want or self.digits.dtype != jnp.int8 or (g and (m != 1 or k % g)):
            raise QuantFormatError(f"x_digits (group={g}) do not fit x [{m}, {k}]: want shapes {want} with int8 "
                                   f"digits (planes: one row, K a multiple of G); got {got}, {self.digits.dtype}")


jax.tree_util.register_dataclass(ActDigits, data_fields=["step", "digits", "group_sums"], meta_fields=["group"])


def check_layout(layout) -> None:
    """``layout``: None (no digits) or what ``ActDigits.group`` holds."""
    if layout is not None and not (isinstance(layout, int) and layout >= 0 and (layout == 0 or layout % 2 == 0)):
        raise ValueError(f"digits layout must be None, {LAYOUTS}; got {layout!r}")


def store_planes(planes_ref, xg_ref, step_ref, halves, gm, row0, interpret: bool) -> None:
    """The planes layout of groups ``row0 ..``: ``halves`` two [rows, G/2] float32 (each group's low and high half;
    rows past K/G zero, ``gm`` [rows] marks the real ones) -> their rows of ``planes_ref [4, K/G, G/2]`` int8, of
    ``xg_ref [K/G]`` and of ``step_ref [K/G]`` float32 (a step per group)."""
    rows, g2 = halves[0].shape
    amax = jnp.maximum(jnp.max(jnp.abs(halves[0]), axis=1, keepdims=True),
                       jnp.max(jnp.abs(halves[1]), axis=1, keepdims=True))  # [rows, 1]
    step, inv = split_step(amax, SPLIT_STEPS, interpret)
    xg = jnp.zeros((rows,), jnp.float32)
    for h, xf in enumerate(halves):
        xs, hi, lo = split_values(xf, step, inv, SPLIT_STEPS, interpret)
        for j, d in enumerate((hi, lo)):
            pltriton.store(planes_ref.at[pl.ds(2 * h + j, 1), pl.ds(row0, rows), :],
                           d.astype(jnp.int8).reshape(1, rows, g2), mask=gm[None, :, None])
        xg = xg + jnp.sum(xs.astype(jnp.float32), axis=1)
    pltriton.store(xg_ref.at[pl.ds(row0, rows)], xg, mask=gm)
    pltriton.store(step_ref.at[pl.ds(row0, rows)], step.reshape(rows), mask=gm)


def planes_geometry(k: int, group: int) -> tuple[int, int, int]:
    """(K/G groups, their count padded to a power of two, G/2) of the planes layout."""
    if group <= 0 or group % 2 or k % group:
        raise QuantFormatError(f"the planes layout needs K a multiple of an even group size; got K={k}, G={group}")
    kg = k // group
    return kg, 1 << max(0, (kg - 1).bit_length()), group // 2


def digit_out_shapes(m: int, k: int, layout: int) -> list[jax.ShapeDtypeStruct]:
    """The kernel outputs a producer adds for ``layout``: rows (step [M, 1], digits [2, M, K]); planes (digits
    [4, K/G, G/2], group sums [K/G], steps [K/G])."""
    f32, i8 = jnp.float32, jnp.int8
    if layout == 0:
        return [jax.ShapeDtypeStruct((m, 1), f32), jax.ShapeDtypeStruct((2, m, k), i8)]
    kg, _, g2 = planes_geometry(k, layout)
    return [jax.ShapeDtypeStruct((4, kg, g2), i8), jax.ShapeDtypeStruct((kg,), f32), jax.ShapeDtypeStruct((kg,), f32)]


def pack(outs, m: int, k: int, layout: int) -> ActDigits:
    """A producer's digit outputs (``digit_out_shapes``) -> ``ActDigits``."""
    if layout == 0:
        step, d = outs
        return ActDigits(step=step, digits=d.reshape(2 * m, k), group_sums=None, group=0)
    planes, xg, step = outs
    return ActDigits(step=step, digits=planes, group_sums=xg, group=layout)
