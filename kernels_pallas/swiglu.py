"""GPU Pallas kernel (Triton lowering): SwiGLU of a fused gate/up row, writing the int4 GEMV's digit planes too.

Public: ``swiglu_digits`` (jitted wrapper) and ``swiglu_reference`` (plain jnp, the truth).

``swiglu_digits(gate_up [1, 2F], group) -> (h [1, F], ActDigits)``: ``gate = gate_up[:, :F]``, ``up = gate_up[:, F:]``
(Hugging Face's ``[gate | up]`` column order), ``h = up * silu(gate)`` as Hugging Face computes it in a 16-bit
dtype (``silu(gate)`` in float32 rounded to the dtype, times ``up`` in float32, rounded), and h's digits in the
planes layout of ``act_digits`` (a step per group of G), which the down projection's one-row integer-dot GEMV would
otherwise compute in a launch of its own. A step per group needs no row-wide max, so the launch spreads over the GPU:
program i owns ``groups`` groups of G (each group's two halves loaded apart, as the planes store them). Session 25's
first version (one program a row, a step a row: ``experiments/results/qmatmul_diag/s25_digits/``) lost to XLA's
SwiGLU fusion plus the digit launch on the H100.

Block sizes (keyword-only, static): ``groups`` a program, ``num_warps``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .act_digits import ActDigits, digit_out_shapes, pack, planes_geometry, store_planes


def swiglu_reference(gate_up):
    """Plain jnp: gate_up [R, 2F] (16-bit float) -> h [R, F] in its dtype (module docstring)."""
    dtype = gate_up.dtype
    gate, up = jnp.split(gate_up.astype(jnp.float32), 2, axis=-1)
    act = jax.nn.silu(gate).astype(dtype).astype(jnp.float32)
    return (up * act).astype(dtype)


def _kernel(x_ref, h_ref, planes_ref, xg_ref, step_ref, *, kg, rows, interpret):
    # x_ref [2, F/G, 2, G/2] (gate then up, each group's low and high half); h_ref [F/G, 2, G/2]; program i owns
    # groups [i * rows, (i + 1) * rows), those past F/G masked. planes_ref [4, F/G, G/2], xg_ref, step_ref [F/G].
    g2 = x_ref.shape[3]
    row0 = pl.program_id(0) * rows
    gm = row0 + jnp.arange(rows) < kg

    def load(p, h):
        return pltriton.load(x_ref.at[pl.ds(p, 1), pl.ds(row0, rows), pl.ds(h, 1), :], mask=gm[None, :, None, None],
                             other=0.0).reshape(rows, g2).astype(jnp.float32)

    halves = []
    for h in range(2):
        gate, up = load(0, h), load(1, h)
        act = (gate / (1.0 + jnp.exp(-gate))).astype(h_ref.dtype).astype(jnp.float32)
        v = (up * act).astype(h_ref.dtype)
        pltriton.store(h_ref.at[pl.ds(row0, rows), pl.ds(h, 1), :], v.reshape(rows, 1, g2), mask=gm[:, None, None])
        halves.append(v.astype(jnp.float32))
    store_planes(planes_ref, xg_ref, step_ref, halves, gm, row0, interpret)


@functools.partial(jax.jit, static_argnames=("group", "groups", "num_warps", "interpret"))
def swiglu_digits(gate_up, group: int, *, groups: int = 4, num_warps: int = 4, interpret: bool = False
                  ) -> tuple[jax.Array, ActDigits]:
    """gate_up [1, 2F] (bfloat16 / float16; G dividing F) -> (h [1, F], h's ``ActDigits`` in the planes layout of
    group G); see the module docstring."""
    if (gate_up.ndim != 2 or gate_up.shape[0] != 1 or gate_up.shape[1] % 2 or not jnp.issubdtype(gate_up.dtype,
                                                                                                 jnp.floating)
            or jnp.dtype(gate_up.dtype).itemsize != 2):
        raise ValueError(f"gate_up must be one 16-bit float row [1, 2F]; got {gate_up.dtype} {gate_up.shape}")
    if groups < 1 or groups & (groups - 1) or num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"groups must be a power of two and num_warps one of 1-32 (powers of two); got "
                         f"groups={groups}, num_warps={num_warps}")
    f = gate_up.shape[1] // 2
    kg, _, g2 = planes_geometry(f, group)
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    outs = pl.pallas_call(
        functools.partial(_kernel, kg=kg, rows=groups, interpret=interpret), grid=(pl.cdiv(kg, groups),),
        in_specs=[full((2, kg, 2, g2))],
        out_specs=[full((kg, 2, g2)), full((4, kg, g2)), full((kg,)), full((kg,))],
        out_shape=[jax.ShapeDtypeStruct((kg, 2, g2), gate_up.dtype), *digit_out_shapes(1, f, group)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1), interpret=interpret,
        name="swiglu_digits",
    )(gate_up.reshape(2, kg, 2, g2))
    return outs[0].reshape(1, f), pack(outs[1:], 1, f, group)
