"""GPU Pallas kernel (Triton lowering): a dense matmul for few rows whose split-K partial sums go to the next kernel.

Public: ``splitk_matmul`` (jitted wrapper) and ``splitk_matmul_reference`` (plain jnp, the truth).

``splitk_matmul(x [M, K], w [K, N]) -> p [S, M, N]`` float32 with ``sum_s p[s] = x @ w``: split ``s`` of
``split_k = S`` owns a run of K's ``block_k`` steps and writes its own partial sums. At decode shapes (M up to a
few dozen rows, N = 4096, K = 4096 or 13696 on GLM-4-9B) the weight read sets the time and N alone gives too few
programs to fill the GPU, so K is split; XLA does the same inside its GEMM, then sums the partials in a fusion
of its own (2-3 us a call at batch 32). Here the partials are the output: the kernel that consumes them
(``add_rms_norm`` with ``x`` [S, R, D]) sums them while it loads them, and that fusion is gone.

Grid ``(N / block_n, S)``: each program holds all M rows (M a power of two from 16 to 128: the tensor-core dot's
shapes; other M take XLA's dot) and a ``[block_k, block_n]`` weight tile a step; ``num_stages`` asks Triton to keep
that many tiles in flight. K must be a multiple of ``block_k``; when the steps do not divide evenly over the splits
the last split runs fewer.

Block sizes (keyword-only, static): ``block_n``, ``block_k``, ``split_k``, ``num_warps``, ``num_stages``; tuned sizes
sit in ``tuned/splitk_matmul.json`` (``experiments/tune_splitk_matmul.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .tuned_device import rows_for

ROWS = (16, 32, 64, 128)  # M the kernel takes
TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned", "splitk_matmul.json")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SplitKBlocks:
    """The kernel's static block sizes (``splitk_matmul(x, w, **dataclasses.asdict(blocks))``)."""

    block_n: int = 64
    block_k: int = 128
    split_k: int = 2
    num_warps: int = 4
    num_stages: int = 4


def splitk_matmul_reference(x, w, *, split_k: int, block_k: int):
    """Plain jnp: the partial sums [S, M, N] float32 of the same K runs the kernel takes."""
    k = x.shape[1]
    steps = k // block_k
    per = -(-steps // split_k)
    parts = []
    for s in range(split_k):
        lo, hi = min(s * per, steps) * block_k, min((s + 1) * per, steps) * block_k
        parts.append(jnp.dot(x[:, lo:hi], w[lo:hi], preferred_element_type=jnp.float32))
    return jnp.stack(parts)


def _kernel(*refs, block_k: int, k_total: int, split_k: int, aliased: bool):
    # x_ref [M, K]; w_ref [K, BN]; o_ref [M, BN]: split s's partial sums.
    x_ref, w_ref, o_ref = refs[:2] + refs[-1:] if aliased else refs
    total = k_total // block_k
    per = -(-total // split_k)
    first = pl.program_id(1) * per
    steps = per if total % split_k == 0 else jnp.clip(total - first, 0, per)

    def body(i, acc):
        k0 = pl.multiple_of((first + i) * block_k, block_k)
        xt = x_ref[:, pl.ds(k0, block_k)]  # [M, BK]
        wt = w_ref[pl.ds(k0, block_k), :]  # [BK, BN]
        return acc + jnp.dot(xt, wt, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


def check_operands(x, w, *, block_n: int, block_k: int, num_warps: int, num_stages: int, cols: str = "N",
                   col_div: int = 1) -> None:
    """The checks this kernel and ``glu_matmul`` share: x [M, K] (M in ROWS), w [K, cols * col_div], one float dtype,
    power-of-two blocks dividing K and cols. Raises ValueError naming what is wrong."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or w.shape[1] % col_div:
        shape = "N" if col_div == 1 else f"{col_div}{cols}"
        raise ValueError(f"x must be [M, K] and w [K, {shape}] with the same K; got x {x.shape} and w {w.shape}")
    if x.shape[0] not in ROWS:
        raise ValueError(f"x must have M in {ROWS} rows (the tensor-core dot's shapes); got M = {x.shape[0]}")
    if x.dtype != w.dtype or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x and w must share one float dtype; got {x.dtype} and {w.dtype}")
    for name, v in (("block_n", block_n), ("block_k", block_k)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {v}")
    k, n = w.shape[0], w.shape[1] // col_div
    if k % block_k or n % block_n:
        raise ValueError(f"K = {k} must be a multiple of block_k = {block_k} and {cols} = {n} of block_n = {block_n}")
    if num_warps not in (1, 2, 4, 8, 16) or num_stages < 1:
        raise ValueError(f"num_warps must be a power of two <= 16 and num_stages >= 1; got {num_warps}, {num_stages}")


def check_inputs(x, w, *, block_n: int, block_k: int, split_k: int, num_warps: int, num_stages: int) -> None:
    """Raise ValueError naming what is wrong, before any launch."""
    check_operands(x, w, block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages)
    if not 1 <= split_k <= w.shape[0] // block_k:
        raise ValueError(f"split_k must be in [1, K / block_k = {w.shape[0] // block_k}]; got {split_k}")


def _launch(x, w, out, block_n, block_k, split_k, num_warps, num_stages, interpret):
    m, k = x.shape
    n = w.shape[1]
    out_shape = jax.ShapeDtypeStruct((split_k, m, n), jnp.float32)
    out_spec = pl.BlockSpec((pl.squeezed, m, block_n), lambda j, s: (s, 0, j))
    specs = [pl.BlockSpec((m, k), lambda j, s: (0, 0)), pl.BlockSpec((k, block_n), lambda j, s: (0, j))]
    operands, aliases = [x, w], {}
    if out is not None:
        if out.shape != out_shape.shape or out.dtype != jnp.float32:
            raise ValueError(f"out must be float32 {out_shape.shape}; got {out.dtype} {out.shape}")
        operands, specs, aliases = operands + [out], specs + [out_spec], {2: 0}
    kernel = functools.partial(_kernel, block_k=block_k, k_total=k, split_k=split_k, aliased=out is not None)
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n // block_n, split_k), in_specs=specs, out_specs=out_spec,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages), interpret=interpret,
        name="splitk_matmul",
    )(*operands)


# Reverse mode (a bfloat16 model trained on a GPU without remat runs its decode-shaped steps through this kernel):
# the backward pass is the VJP of the plain-jnp reference (XLA), so gradients never transpose a kernel.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _differentiable(x, w, block_n, block_k, split_k, num_warps, num_stages, interpret):
    return _launch(x, w, None, block_n, block_k, split_k, num_warps, num_stages, interpret)


def _fwd(x, w, *static):
    return _differentiable(x, w, *static), (x, w)


def _bwd(block_n, block_k, split_k, num_warps, num_stages, interpret, saved, ct):
    _, vjp = jax.vjp(lambda a, b: splitk_matmul_reference(a, b, split_k=split_k, block_k=block_k), *saved)
    return vjp(ct)


_differentiable.defvjp(_fwd, _bwd)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "split_k", "num_warps", "num_stages", "interpret"))
def splitk_matmul(x, w, out=None, *, block_n: int = 64, block_k: int = 128, split_k: int = 2, num_warps: int = 4,
                  num_stages: int = 4, interpret: bool = False):
    """x [M, K], w [K, N] (one float dtype) -> float32 partial sums [split_k, M, N]; see the module docstring.
    ``out`` (tests): a float32 [split_k, M, N] buffer the kernel must overwrite everywhere (aliased; not
    differentiable). Differentiable otherwise: reverse mode takes the reference's VJP."""
    check_inputs(x, w, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                 num_stages=num_stages)
    static = (block_n, block_k, split_k, num_warps, num_stages, interpret)
    if out is not None:
        return _launch(x, w, out, *static)
    return _differentiable(x, w, *static)


@functools.lru_cache(maxsize=None)
def _table(path: str = TABLE_PATH) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def tuned_entry(path: str, device_kind: str, m: int, k: int, n: int) -> dict | None:
    """The config dict tuned for (device, M, K, N) in the table at ``path``, or None where that has no entry or the
    tuner found XLA faster ("xla"), and for an M the kernels do not take."""
    if m not in ROWS:
        return None
    shape = [e for e in _table(path).get("entries", []) if (e["m"], e["k"], e["n"]) == (m, k, n)]
    fits = rows_for(shape, device_kind)  # this device's row, else a sibling chip's (tuned_device)
    return dict(fits[0]["config"]) if fits and fits[0]["config"] != "xla" else None


def tuned_blocks(device_kind: str, m: int, k: int, n: int) -> SplitKBlocks | None:
    """The tuned block sizes for (device, M, K, N), or None (the caller then uses XLA's dot, whose split-K partials
    XLA sums itself)."""
    entry = tuned_entry(TABLE_PATH, device_kind, m, k, n)
    return None if entry is None else SplitKBlocks(**entry)
