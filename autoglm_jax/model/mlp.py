"""GLM's MLP: a fused gate/up projection and SwiGLU, then the down projection.

In a decode step (``partials=True``) on a GPU, the projection and SwiGLU may run as one Pallas kernel
(``kernels_pallas.glu_matmul``: SwiGLU in the matmul's epilogue) where that kernel is tuned faster than XLA's dot
and SwiGLU fusion for this (M, D, 2F), and down_proj may return split-K partial sums (``Linear``). Where down_proj
is quantized and takes its input's digit planes from SwiGLU (``QuantizedLinear.digits_layout``: a batch-1 int4
decode step on the GPU), SwiGLU runs as one Pallas kernel that writes them too (``kernels_pallas.swiglu``), instead
of XLA's fusion and the digit launch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from kernels_pallas.glu_matmul import GluBlocks, glu_matmul, tuned_blocks
from kernels_pallas.swiglu import swiglu_digits
from sharding.partition import constrain

from .linear import Linear, decode_blocks, gpu_kernels_on


class MLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, param_dtype, init_std: float, rngs: nnx.Rngs):
        self.gate_up_proj = Linear(dim, 2 * hidden, axes=("embed", "mlp"), dtype=dtype, param_dtype=param_dtype,
                                   init_std=init_std, rngs=rngs)
        self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), dtype=dtype, param_dtype=param_dtype,
                                init_std=init_std, rngs=rngs)
        # gate_up_proj columns come in this many groups [gate_g | up_g] (1 = the HF order [gate | up]);
        # sharding/layout.py sets it to the tensor degree so each shard's columns are one group.
        self.gate_up_groups = 1
        # partials=True: "auto" takes the tuned glu_matmul kernel (GPU, 16-bit, one device), "xla" never, a
        # GluBlocks wherever the kernel takes M (interpret mode off GPU: tests).
        self.glu_kernel: str | GluBlocks = "auto"
        # SwiGLU writing down_proj's digit planes: "auto" where down_proj takes them and the GPU kernels run
        # (``linear.gpu_kernels_on``), "pallas" wherever it takes them (interpret mode off GPU: tests), "xla" never.
        self.swiglu_kernel = "auto"

    def __call__(self, x: jax.Array, *, partials: bool = False, x_digits=None) -> jax.Array:
        """x: [B, T, D] -> [B, T, D] (with ``partials``, maybe down_proj's split-K partial sums [S, B, T, D]
        float32: ``Linear``); x_digits: x's ``act_digits.ActDigits`` from the norm before, for a quantized
        gate_up_proj (or None)."""
        blocks = self._glu_blocks(x) if partials else None
        if blocks is not None:
            lin = self.gate_up_proj
            hidden = glu_matmul(x.reshape(-1, lin.in_features).astype(lin.dtype), lin.kernel[...].astype(lin.dtype),
                                **dataclasses.asdict(blocks), interpret=jax.default_backend() != "gpu")
            return self.down_proj(hidden.reshape(*x.shape[:-1], -1), partials=partials)
        g = self.gate_up_groups
        gate_up = self.gate_up_proj(x, digits=x_digits)  # [B, T, 2F]
        group = self._down_planes(gate_up)
        if group is not None:
            hidden, digits = swiglu_digits(gate_up.reshape(1, -1), group, interpret=jax.default_backend() != "gpu")
            return self.down_proj(hidden.reshape(*x.shape[:-1], -1), partials=partials, digits=digits)
        gate_up = gate_up.reshape(*gate_up.shape[:-1], g, gate_up.shape[-1] // g)  # [B, T, groups, 2F / groups]
        gate, up = (z.reshape(*x.shape[:-1], -1) for z in jax.numpy.split(gate_up, 2, axis=-1))  # [B, T, F]
        hidden = constrain(up * jax.nn.silu(gate), ("batch", "sequence", "mlp"))
        return self.down_proj(hidden, partials=partials)

    def _down_planes(self, gate_up) -> int | None:
        """The group of the digit planes down_proj takes from the SwiGLU kernel, or None (XLA's fusion)."""
        if self.swiglu_kernel not in ("auto", "pallas", "xla"):
            raise ValueError(f"MLP.swiglu_kernel={self.swiglu_kernel!r}; allowed: 'auto', 'pallas', 'xla'")
        on = self.swiglu_kernel == "pallas" or (self.swiglu_kernel == "auto" and gpu_kernels_on(gate_up.dtype))
        if (not on or self.gate_up_groups != 1 or not hasattr(self.down_proj, "digits_layout")
                or jax.numpy.dtype(gate_up.dtype).itemsize != 2):
            return None
        hidden = jax.ShapeDtypeStruct((*gate_up.shape[:-1], gate_up.shape[-1] // 2), gate_up.dtype)
        return self.down_proj.digits_layout(hidden, producer="swiglu") or None

    def _glu_blocks(self, x) -> GluBlocks | None:
        lin = self.gate_up_proj
        if not isinstance(lin, Linear) or lin.bias is not None or self.gate_up_groups != 1:
            return None  # quantized, biased or sharded-column projections take XLA's path
        return decode_blocks(self.glu_kernel, GluBlocks, math.prod(x.shape[:-1]), lin.dtype,
                             lambda dev, m: tuned_blocks(dev, m, lin.in_features, lin.out_features), "MLP.glu_kernel")
