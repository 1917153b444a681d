"""Dense linear layer: ``y[..., O] = x[..., I] @ kernel[I, O] + bias[O]``.

Parameters carry ``logical_axes`` metadata (names such as ``"embed"`` or ``"mlp"``); ``sharding/`` maps
them to mesh axes. Quantized weights use ``QuantizedLinear`` with the same call signature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Linear(nnx.Module):
    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str], use_bias: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        key = rngs.params()
        self.kernel = nnx.Param(
            init_std * jax.random.normal(key, (in_features, out_features), param_dtype),
            logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., I] -> [..., O] in the compute dtype."""
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
