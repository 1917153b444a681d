"""RMSNorm as GLM computes it: normalise in float32, cast back, then scale.

``add_and_norm`` also takes the residual add that precedes each norm of a decoder layer (vLLM's fused add + norm):
on a GPU, for 16-bit activations and no multi-device mesh, one Pallas launch
(``kernels_pallas.add_rms_norm``) instead of XLA's three small kernels per site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.add_rms_norm import add_rms_norm

from .linear import gpu_kernels_on

FUSED_KERNELS = ("auto", "pallas", "xla")


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        # add_and_norm: "auto" runs the fused Pallas kernel on a GPU for 16-bit activations outside a multi-device
        # mesh, XLA elsewhere; "pallas" always (interpret mode off GPU: tests); "xla" never.
        self.fused_kernel = "auto"

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in the compute dtype."""
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)

    def add_and_norm(self, x: jax.Array, residual: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """x, residual: [..., D] (residual None: nothing to add) -> (norm(s), s) with s = x + residual in the
        compute dtype: the normed input of the next block and the new residual stream. x may also be float32
        split-K partial sums [S, ..., D] of the matmul that made it (``Linear(partials=True)``), summed here."""
        if residual is not None and x.ndim == residual.ndim + 1:  # partial sums
            if self._fused_on(residual):
                return self._fused(x, residual)
            x = jnp.sum(x, axis=0)
        x = x.astype(self.dtype)
        if residual is None:
            return self(x), x
        residual = residual.astype(self.dtype)
        if not self._fused_on(x):
            s = x + residual
            return self(s), s
        return self._fused(x, residual)

    def add_norm_digits(self, x: jax.Array, residual: jax.Array | None, consumer) -> tuple[jax.Array, jax.Array,
                                                                                              object]:
        """``add_and_norm`` and, where the fused kernel runs and ``consumer`` (the layer the normed output feeds)
        would compute its input's fixed-point digits itself (``QuantizedLinear.digits_layout``), those digits
        written by the same launch -> (y, s, ``act_digits.ActDigits`` or None)."""
        layout = None
        if (residual is not None and x.ndim == residual.ndim and hasattr(consumer, "digits_layout")
                and self._fused_on(residual)):
            layout = consumer.digits_layout(residual)
        if layout is None:
            return (*self.add_and_norm(x, residual), None)
        return self._fused(x.astype(self.dtype), residual, digits=layout)

    def _fused(self, x, residual, digits=None):
        """add_rms_norm on x [..., D] (or partials [S, ..., D]) and residual [..., D] -> (y, s) shaped as residual;
        with a ``digits`` layout, (y, s, y's ``ActDigits``)."""
        shape = residual.shape
        rows = x.reshape(*x.shape[:x.ndim - residual.ndim], -1, shape[-1])  # [R, D] or [S, R, D]
        y, s, *d = add_rms_norm(rows, residual.astype(self.dtype).reshape(-1, shape[-1]),
                                self.scale[...].astype(self.dtype), eps=self.eps, digits=digits,
                                interpret=jax.default_backend() != "gpu")
        return (y.reshape(shape), s.reshape(shape), *d)

    def _fused_on(self, x) -> bool:
        if self.fused_kernel not in FUSED_KERNELS:
            raise ValueError(f"RMSNorm.fused_kernel={self.fused_kernel!r}; allowed: {FUSED_KERNELS}")
        if self.fused_kernel != "auto":
            return self.fused_kernel == "pallas"
        return gpu_kernels_on(self.dtype)
