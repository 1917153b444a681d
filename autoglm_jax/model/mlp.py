"""GLM's MLP: a fused gate/up projection and SwiGLU, then the down projection."""

from __future__ import annotations

import jax
from flax import nnx

from .linear import Linear


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
        self.gate_up_proj = Linear(dim, 2 * hidden, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                                   init_std=init_std, rngs=rngs)
        self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                                init_std=init_std, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        gate_up = self.gate_up_proj(x)  # [B, T, 2F]
        gate, up = jax.numpy.split(gate_up, 2, axis=-1)
        return self.down_proj(up * jax.nn.silu(gate))
