"""Dense linear layer: ``y[..., O] = x[..., I] @ kernel[I, O] + bias[O]``.

Parameters carry ``logical_axes`` metadata (names such as ``"embed"`` or ``"mlp"``); ``sharding/`` maps
them to mesh axes. Quantized weights use ``QuantizedLinear`` with the same call signature.

``partials=True`` (a decode step whose next op is ``RMSNorm.add_and_norm``) lets a bias-free layer return the
float32 split-K partial sums [S, ..., O] of ``kernels_pallas.splitk_matmul`` instead of y, where that kernel is
tuned faster than XLA's dot for this (M, I, O) on this GPU (batch-32 decode on the H100: down_proj 42.2 against
45.6 us a site); the norm kernel adds them up as it loads them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.paged_attention import device_kind
from kernels_pallas.splitk_matmul import ROWS, SplitKBlocks, splitk_matmul, tuned_blocks
from sharding.partition import on_one_device

SETTINGS = ("auto", "xla")  # Linear.splitk and MLP.glu_kernel, besides their blocks


def gpu_kernels_on(dtype) -> bool:
    """Where "auto" takes the decode-step Pallas kernels: a GPU, 16-bit compute, no multi-device mesh."""
    return jax.default_backend() == "gpu" and jnp.dtype(dtype).itemsize == 2 and on_one_device()


def decode_blocks(setting, blocks_type: type, m: int, dtype, tuned, name: str):
    """The block sizes a decode-site kernel runs with for M rows, or None for XLA's path. ``setting``: a
    ``blocks_type`` (forced, wherever the kernel takes M; interpret mode off GPU: tests), "xla" (never) or "auto"
    (``tuned(device_kind, m)`` where ``gpu_kernels_on(dtype)``); ``name`` (e.g. "Linear.splitk") for the error."""
    if isinstance(setting, blocks_type):
        return setting if m in ROWS else None
    if setting not in SETTINGS:
        raise ValueError(f"{name}={setting!r}; allowed: {SETTINGS} or a {blocks_type.__name__}")
    if setting == "xla" or not gpu_kernels_on(dtype):
        return None
    return tuned(device_kind(), m)


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
        # partials=True: "auto" takes the tuned split-K kernel on a GPU (16-bit compute, one device), "xla" never,
        # a SplitKBlocks wherever the kernel takes M (interpret mode off GPU: tests).
        self.splitk: str | SplitKBlocks = "auto"

    def __call__(self, x: jax.Array, *, partials: bool = False, digits=None) -> jax.Array:
        """x: [..., I] -> [..., O] in the compute dtype; with ``partials``, maybe float32 partial sums [S, ..., O]
        (see the module docstring). digits: ignored (``QuantizedLinear`` takes them; a float layer never asks)."""
        del digits
        blocks = self._splitk_blocks(x) if partials and self.bias is None else None
        if blocks is not None:
            x2 = x.reshape(-1, self.in_features).astype(self.dtype)
            p = splitk_matmul(x2, self.kernel[...].astype(self.dtype), **dataclasses.asdict(blocks),
                              interpret=jax.default_backend() != "gpu")
            return p.reshape(blocks.split_k, *x.shape[:-1], self.out_features)
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def _splitk_blocks(self, x) -> SplitKBlocks | None:
        return decode_blocks(self.splitk, SplitKBlocks, math.prod(x.shape[:-1]), self.dtype,
                             lambda dev, m: tuned_blocks(dev, m, self.in_features, self.out_features), "Linear.splitk")
