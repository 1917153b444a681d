"""GLM's MLP: a fused gate/up projection and SwiGLU, then the down projection."""

from __future__ import annotations

import jax
from flax import nnx

from sharding.partition import constrain

from .linear import Linear


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
        self.gate_up_proj = Linear(dim, 2 * hidden, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                                   init_std=init_std, rngs=rngs)
        self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                                init_std=init_std, rngs=rngs)
        # gate_up_proj columns come in this many groups [gate_g | up_g] (1 = the HF order [gate | up]);
        # sharding/layout.py sets it to the tensor degree so each shard's columns are one group.
        self.gate_up_groups = 1

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        g = self.gate_up_groups
        gate_up = self.gate_up_proj(x)  # [B, T, 2F]
        gate_up = gate_up.reshape(*gate_up.shape[:-1], g, gate_up.shape[-1] // g)  # [B, T, groups, 2F / groups]
        gate, up = (z.reshape(*x.shape[:-1], -1) for z in jax.numpy.split(gate_up, 2, axis=-1))  # [B, T, F]
        hidden = constrain(up * jax.nn.silu(gate), ("batch", "sequence", "mlp"))
        return self.down_proj(hidden)
