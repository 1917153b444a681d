"""GPU Pallas kernel (Triton lowering): the MLP's gate/up projection with SwiGLU applied in its epilogue.

Public: ``glu_matmul`` (jitted wrapper) and ``glu_matmul_reference`` (plain jnp, the truth).

``glu_matmul(x [M, K], w [K, 2F]) -> h [M, F] = up * silu(gate)`` where ``[gate | up] = x @ w`` (Hugging Face's
``gate_up_proj`` column order). In a decode step XLA writes the projection [M, 2F], then reads it back in a fusion
of its own for SwiGLU (2.3 us a layer at batch 32 on the H100, mostly launch latency). Here program j holds
column block j of both halves (``w`` is passed twice, with two index maps), two float32 accumulators, and
writes ``h``'s block j: gate and up rounded to the dtype (XLA's path writes them so), SwiGLU in float32 and
rounded once (as XLA's fusion computes it, its excess precision allowed by default).

Grid ``(F / block_n,)``; each program holds all M rows (``splitk_matmul.ROWS``). K must be a multiple of
``block_k`` and F of ``block_n``. Block sizes (keyword-only, static): ``block_n``, ``block_k``, ``num_warps``,
``num_stages``; tuned sizes sit in ``tuned/glu_matmul.json`` (``experiments/tune_splitk_matmul.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .splitk_matmul import check_operands, tuned_entry

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned", "glu_matmul.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GluBlocks:
    """The kernel's static block sizes (``glu_matmul(x, w, **dataclasses.asdict(blocks))``)."""

    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4


def glu_matmul_reference(x, w):
    """Plain jnp, as the model's XLA path computes it: [gate | up] = x @ w in x's dtype, then up * silu(gate)."""
    gate, up = jnp.split(jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype), 2, axis=-1)
    return up * jax.nn.silu(gate)


def _kernel(*refs, block_k: int, k_total: int, aliased: bool):
    # x_ref [M, K]; g_ref, u_ref [K, BN]: column block j of gate and of up; o_ref [M, BN].
    x_ref, g_ref, u_ref, o_ref = refs[:3] + refs[-1:] if aliased else refs

    def body(i, accs):
        k0 = pl.multiple_of(i * block_k, block_k)
        xt = x_ref[:, pl.ds(k0, block_k)]  # [M, BK]
        g = accs[0] + jnp.dot(xt, g_ref[pl.ds(k0, block_k), :], preferred_element_type=jnp.float32)
        return g, accs[1] + jnp.dot(xt, u_ref[pl.ds(k0, block_k), :], preferred_element_type=jnp.float32)

    zero = jnp.zeros(o_ref.shape, jnp.float32)
    g, u = lax.fori_loop(0, k_total // block_k, body, (zero, zero))
    dtype = o_ref.dtype
    rnd = lambda v: v.astype(dtype).astype(jnp.float32)  # noqa: E731 - one rounding to the dtype
    g, u = rnd(g), rnd(u)
    o_ref[...] = (u * (g / (1.0 + jnp.exp(-g)))).astype(dtype)


def check_inputs(x, w, *, block_n: int, block_k: int, num_warps: int, num_stages: int) -> None:
    """Raise ValueError naming what is wrong, before any launch."""
    check_operands(x, w, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages, cols="F",
                   col_div=2)


def _launch(x, w, out, block_n, block_k, num_warps, num_stages, interpret):
    m, k = x.shape
    f = w.shape[1] // 2
    out_shape = jax.ShapeDtypeStruct((m, f), x.dtype)
    out_spec = pl.BlockSpec((m, block_n), lambda j: (0, j))
    half = f // block_n
    specs = [pl.BlockSpec((m, k), lambda j: (0, 0)), pl.BlockSpec((k, block_n), lambda j: (0, j)),
             pl.BlockSpec((k, block_n), lambda j: (0, j + half))]
    operands, aliases = [x, w, w], {}
    if out is not None:
        if out.shape != out_shape.shape or out.dtype != x.dtype:
            raise ValueError(f"out must be {x.dtype} {out_shape.shape}; got {out.dtype} {out.shape}")
        operands, specs, aliases = operands + [out], specs + [out_spec], {3: 0}
    kernel = functools.partial(_kernel, block_k=block_k, k_total=k, aliased=out is not None)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(half,), in_specs=specs, out_specs=out_spec, input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages), interpret=interpret,
        name="glu_matmul",
    )(*operands)


# Reverse mode: the backward pass is the VJP of the plain-jnp reference (XLA), as in splitk_matmul.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _differentiable(x, w, block_n, block_k, num_warps, num_stages, interpret):
    return _launch(x, w, None, block_n, block_k, num_warps, num_stages, interpret)


def _fwd(x, w, *static):
    return _differentiable(x, w, *static), (x, w)


def _bwd(block_n, block_k, num_warps, num_stages, interpret, saved, ct):
    return jax.vjp(glu_matmul_reference, *saved)[1](ct)


_differentiable.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "num_stages", "interpret"))
def glu_matmul(x, w, out=None, *, block_n: int = 64, block_k: int = 128, num_warps: int = 4, num_stages: int = 4,
               interpret: bool = False):
    """x [M, K], w [K, 2F] (one float dtype) -> up * silu(gate) [M, F]; see the module docstring. ``out`` (tests):
    an [M, F] buffer the kernel must overwrite everywhere (aliased; not differentiable)."""
    check_inputs(x, w, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    static = (block_n, block_k, num_warps, num_stages, interpret)
    return _launch(x, w, out, *static) if out is not None else _differentiable(x, w, *static)


def tuned_blocks(device_kind: str, m: int, k: int, f2: int) -> GluBlocks | None:
    """The tuned block sizes for (device, M, K, 2F), or None (the caller then runs XLA's dot and SwiGLU)."""
    entry = tuned_entry(TABLE_PATH, device_kind, m, k, f2)
    return None if entry is None else GluBlocks(**entry)
