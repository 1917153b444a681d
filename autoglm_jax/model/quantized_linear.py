"""Quantized linear layer: ``y[..., O] = x[..., I] @ dequant(w)[I, O] + bias[O]`` through ``quantized_matmul``.

Same call signature as ``Linear``. Parameters keep ``logical_axes`` metadata: the integer weight keeps the
Linear's ``(in, out)`` axes (int4's packed ``[I/2, O]`` too; W8A8's transposed ``[O, I]`` weight and a K-major
int8 weight ``[O, I]`` have them swapped), per-channel scales take the output axis,
per-group scales and zero points ``[I/group, O]`` take ``(None, out)`` (K-major int4: all three transposed,
axes swapped). ``quantize_model`` swaps every
``Linear`` of a ``GLMForCausalLM`` (except those named in ``keep_float``, by default the LM head) so a
quantized model runs end to end through the kernels. ``k_major=True`` (int8 and int4) stores the weights
K-major, ``[O, I]`` (``Int8Weight.k_major``, ``Int4Weight.k_major``; see ``kernels_pallas.quantized_matmul``);
``k_major="auto"`` picks per weight: int8 K-major unless I > O, int4 K-major always
(``kernels_pallas.quant_formats.resolve_k_major``).

W8A8 with static activations: ``act_scale`` (a ``[1]`` float32 param, e.g. from calibration in
``autoglm_jax.quant``) is the one activation scale of the layer; without it activations are quantized per token
at call time. ``quantize_model(..., static_activations=True)`` gives every W8A8 layer an ``act_scale`` (1.0
until set; a checkpoint restores the calibrated values).
"""

from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.quant_formats import (Int4Weight, Int8Weight, QuantFormatError, W8A8Weight, check_k_major,
                                          quantize)
from kernels_pallas.quantized_matmul import digits_layout, quantized_matmul, resolve_impl

from sharding.kernels import quantized_shard_plan, sharded_quantized_matmul
from sharding.partition import on_one_device

from .linear import Linear

FORMATS = ("int8", "int4", "w8a8")
TAKE_DIGITS = ("auto", "all", "off")  # QuantizedLinear.take_digits
# producer -> the digit layouts that "auto" takes from it, as measured end to end on the H100 (batch-1 decode,
# session 25, experiments/results/qmatmul_diag/s25_digits/): the norm's int8 rows 0.6-1.4% faster (two pairs); with
# a step per int4 group, the norm's and SwiGLU's planes together 1.0% faster than neither (one run each: 3.023 against
# 3.054 ms/token), SwiGLU's alone 0.1-0.6% (two runs); since session 26 int8 gate_up runs the integer-dot GEMV
# (H100 table: kernel "dp4a") and so takes the norm's planes (39.7 against 40.8 us a call with given rows), and int8
# qkv too, through its table entry's given_config (8.4 against 9.9 us); the end to end A/B is not run yet
# (experiments/results/qmatmul_diag/s26_int8_dp4a/)
# "attention" (the dense decode kernel's combine writing o_proj's planes at batch 1, session 26) is not in "auto":
# not yet measured on a GPU; "all" takes it
AUTO_DIGITS = {"norm": ("rows", "planes"), "swiglu": ("planes",)}


class QuantizedLinear(nnx.Module):
    """Holds one quantized weight (see ``kernels_pallas.quant_formats``) and an optional float bias.

    fmt: "int8" | "int4" | "w8a8"; group / symmetric: int4 only; k_major (static, from the weight): int8 / int4
    stored ``[O, I]``; dtype: compute and output dtype; impl / interpret: passed to ``quantized_matmul`` (default:
    dispatch by platform); k_blocks (static, 1 unless ``sharding`` sets it on a row-parallel layer): passed too;
    take_digits: which of x's fixed-point digits this layer takes from the kernel that produced x (the norm before it,
    ``RMSNorm.add_norm_digits``; the MLP's SwiGLU for down_proj; the dense decode attention's combine for o_proj)
    where its path would compute them itself (``digits_layout``): "auto" those of ``AUTO_DIGITS``, "all" every
    producer's, "off" none (A/B switches).
    """

    def __init__(self, weight, *, axes: tuple[str, str], bias: jax.Array | None = None, dtype=jnp.float32,
                 impl: str = "auto", interpret: bool = False, act_scale: jax.Array | None = None):
        if not isinstance(weight, (Int8Weight, Int4Weight, W8A8Weight)):
            raise QuantFormatError(f"QuantizedLinear needs a quantized weight; got {type(weight).__name__}")
        weight.validate()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.dtype, self.impl, self.interpret = dtype, impl, interpret
        self.k_major = bool(getattr(weight, "k_major", False))
        self.k_blocks = 1
        self.take_digits = "auto"
        self.axes = tuple(axes)  # the Linear's logical (in, out) axes: how sharding splits it
        if isinstance(weight, Int4Weight):  # K-major: packed [O, I/2], scale / zero [O, I/group]
            self.fmt, self.group = "int4", weight.group
            gaxes = (axes[1], None) if self.k_major else (None, axes[1])
            self.qweight = nnx.Param(weight.packed, logical_axes=axes[::-1] if self.k_major else axes)
            self.scale = nnx.Param(weight.scale, logical_axes=gaxes)
            self.zero = None if weight.zero is None else nnx.Param(weight.zero, logical_axes=gaxes)
        else:
            self.fmt, self.group = ("w8a8" if isinstance(weight, W8A8Weight) else "int8"), 0
            # W8A8 (and K-major int8) store the int8 weight transposed, [O, I]: the axes follow the storage.
            swapped = self.fmt == "w8a8" or self.k_major
            self.qweight = nnx.Param(weight.qweight, logical_axes=axes[::-1] if swapped else axes)
            self.scale = nnx.Param(weight.scale, logical_axes=(axes[1],))
            self.zero = None
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias), logical_axes=(axes[1],))
        if act_scale is not None and self.fmt != "w8a8":
            raise QuantFormatError(f"act_scale (static activation scale) is for w8a8 only; this layer is {self.fmt}")
        self.act_scale = None if act_scale is None else nnx.Param(
            jnp.asarray(act_scale, jnp.float32).reshape(1), logical_axes=(None,))

    @classmethod
    def from_linear(cls, linear: Linear, fmt: str, *, group: int = 128, symmetric: bool = True,
                    k_major: bool | str = False, impl: str = "auto", interpret: bool = False,
                    act_scale=None) -> "QuantizedLinear":
        """Quantize a ``Linear``'s kernel (round-to-nearest) into ``fmt`` (int8 / int4 ``k_major``: True = stored
        [O, I], ``"auto"`` = per format and shape, see ``resolve_k_major``); the bias stays float."""
        if fmt not in FORMATS:
            raise QuantFormatError(f"fmt={fmt!r}; allowed: {FORMATS}")
        axes = tuple(linear.kernel.get_metadata().get("logical_axes", (None, None)))
        weight = quantize(linear.kernel[...], fmt, group=group, symmetric=symmetric, k_major=k_major)
        bias = None if linear.bias is None else linear.bias[...]
        return cls(weight, axes=axes, bias=bias, dtype=linear.dtype, impl=impl, interpret=interpret,
                   act_scale=act_scale)

    def weight(self):
        """-> the format object (a pytree) built from the parameters."""
        if self.fmt == "int4":
            return Int4Weight(packed=self.qweight[...], scale=self.scale[...],
                              zero=None if self.zero is None else self.zero[...], group=self.group,
                              k_major=self.k_major)
        if self.fmt == "w8a8":
            return W8A8Weight(qweight=self.qweight[...], scale=self.scale[...])
        return Int8Weight(qweight=self.qweight[...], scale=self.scale[...], k_major=self.k_major)

    def digits_layout(self, x, producer: str = "norm") -> int | None:
        """The ``act_digits`` layout in which this layer takes x's digits from ``producer`` ("norm", "swiglu" or
        "attention"): the one its path computes when given them (``quantized_matmul.digits_layout(..., given=True)``),
        as ``take_digits`` allows (None: none; always under a multi-device mesh, where each shard's kernel computes
        its own from its slice of x); x: an array or ``jax.ShapeDtypeStruct`` [..., I]."""
        if self.take_digits not in TAKE_DIGITS:
            raise ValueError(f"QuantizedLinear.take_digits={self.take_digits!r}; allowed: {TAKE_DIGITS}")
        if self.take_digits == "off" or not on_one_device():
            return None
        x = jax.ShapeDtypeStruct(x.shape, self.dtype)
        layout = digits_layout(x, self.weight(), impl=self.path(), interpret=self.interpret, k_blocks=self.k_blocks,
                               given=True)
        if layout is None or self.take_digits == "all":
            return layout
        return layout if ("rows" if layout == 0 else "planes") in AUTO_DIGITS.get(producer, ()) else None

    def __call__(self, x: jax.Array, *, partials: bool = False, digits=None) -> jax.Array:
        """x: [..., I] -> [..., O] in the compute dtype (``partials``, as ``Linear`` takes it: always y here);
        digits: x's ``act_digits.ActDigits`` from its producer, or None. Under a multi-device mesh a kernel path
        runs per shard (``sharding.kernels.sharded_quantized_matmul``)."""
        del partials
        bias = None if self.bias is None else self.bias[...]
        act_scale = None if getattr(self, "act_scale", None) is None else self.act_scale[...]
        x = x.astype(self.dtype)
        if self.shard_plan() is not None:
            return sharded_quantized_matmul(jax.sharding.get_abstract_mesh(), x, self.weight(), self.axes, bias=bias,
                                            out_dtype=self.dtype, act_scale=act_scale, impl=self.impl,
                                            interpret=self.interpret)
        return quantized_matmul(x, self.weight(), bias=bias, out_dtype=self.dtype, impl=self.path(),
                                interpret=self.interpret, act_scale=act_scale, k_blocks=self.k_blocks, x_digits=digits)

    def _runs_kernel(self) -> bool:
        """``impl`` would run a Pallas kernel (GPU / TPU, or interpreted) rather than an XLA path."""
        return resolve_impl(self.impl, self.interpret).startswith("pallas")

    def shard_plan(self) -> str | None:
        """Under a multi-device mesh, for a kernel ``impl``: how the kernel runs per shard
        (``sharding.kernels.quantized_shard_plan``: "column", "row" or "replicated"); None on one device, for an
        XLA ``impl`` (which XLA's SPMD partitioner splits itself), or where no per-shard kernel can serve."""
        if on_one_device() or not self._runs_kernel():
            return None
        mesh = jax.sharding.get_abstract_mesh()
        return quantized_shard_plan(self.weight(), self.axes, dict(mesh.shape))

    def path(self) -> str:
        """The ``impl`` a call on the whole arrays passes: ``impl``, except that a kernel ``impl`` under a
        multi-device mesh with no per-shard plan (``shard_plan``) takes an XLA path that XLA's SPMD partitioner
        splits like any dot -- ``xla_split`` for int8, ``xla`` otherwise: a Pallas kernel there would be an opaque
        custom call run on operands gathered whole (the weight too)."""
        if not on_one_device() and self._runs_kernel() and self.shard_plan() is None:
            return "xla_split" if self.fmt == "int8" else "xla"
        return self.impl


def _children(module):
    for name, value in vars(module).items():
        if isinstance(value, nnx.Module) and not isinstance(value, nnx.List):
            yield name, value
        elif isinstance(value, (list, tuple, nnx.List)):
            for i, item in enumerate(value):
                if isinstance(item, nnx.Module):
                    yield f"{name}.{i}", item


def quantize_model(model: nnx.Module, fmt: str, *, group: int = 128, symmetric: bool = True,
                   keep_float: tuple[str, ...] = ("lm_head",), impl: str = "auto",
                   interpret: bool = False, static_activations: bool = False,
                   k_major: bool | str = False) -> list[str]:
    """Replace, in place, every ``Linear`` of ``model`` by a ``QuantizedLinear`` in ``fmt``.

    keep_float: glob patterns matched against the dotted path (``"layers.0.mlp.down_proj"``) and against the
    attribute name; matching layers stay float. For int4, a layer whose I is not a multiple of ``group``
    raises. static_activations (w8a8 only): each layer gets a static ``act_scale`` (1.0; set it from
    calibration, or restore it from a checkpoint). k_major (int8 and int4): weights stored K-major [O, I]
    (True), [I, O] (False) or per weight (``"auto"``: int8 K-major unless I > O, int4 K-major always, see
    ``kernels_pallas.quant_formats.resolve_k_major``); a quantized checkpoint's ``quantization`` dict records
    it (absent = [I, O]). Returns the dotted paths of the swapped layers.
    """
    if static_activations and fmt != "w8a8":
        raise QuantFormatError(f"static_activations is for fmt='w8a8' only; got fmt={fmt!r}")
    check_k_major(fmt, k_major)
    swapped = []

    def walk(module, prefix):
        for name, child in list(_children(module)):
            path = f"{prefix}{name}"
            if isinstance(child, Linear):
                leaf = name.rsplit(".", 1)[-1]
                if any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(leaf, p) for p in keep_float):
                    continue
                new = QuantizedLinear.from_linear(child, fmt, group=group, symmetric=symmetric, k_major=k_major,
                                                  impl=impl, interpret=interpret,
                                                  act_scale=jnp.ones((1,), jnp.float32) if static_activations else None)
                if "." in name:  # an element of a list attribute
                    attr, idx = name.split(".")
                    getattr(module, attr)[int(idx)] = new
                else:
                    setattr(module, name, new)
                swapped.append(path)
            else:
                walk(child, path + ".")

    walk(model, "")
    return swapped
