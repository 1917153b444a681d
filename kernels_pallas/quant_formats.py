"""Quantized weight formats for ``x[M, I] @ w[I, O]``: layout, packing, scales, zero points -- defined once.

Every format is a frozen dataclass registered as a pytree (``jax.tree_util.register_dataclass``): arrays are
data fields, shape-like facts are static meta fields, so a format passes through ``jit`` and ``nnx`` params.

``Int8Weight`` (weight-only int8, symmetric, per output channel)
    ``qweight[I, O] int8`` in [-127, 127], ``scale[O] float32``;  ``w[i, o] = qweight[i, o] * scale[o]``.
    Opt-in K-major layout (``k_major=True``, a static field): ``qweight[O, I]`` (the reduction dim K = I
    contiguous), ``w[i, o] = qweight[o, i] * scale[o]``. XLA's int8 dot reads a wide K-major weight closer to
    copy bandwidth at M=1 (H100: 0.90 vs 0.78 for gate_up 4096->27392; the [I, O] layout was better for
    down 13696->4096, experiments/results/qmatmul_h100_notes.md). Only the XLA paths of ``quantized_matmul``
    take it on the TPU (the GPU Pallas kernels read both layouts); its tuned-table format name is ``"int8_kmajor"``.

``Int4Weight`` (weight-only int4, grouped along I, two values per byte)
    ``packed[I // 2, O] uint8``, ``scale[I // group, O] bfloat16``, ``zero[I // group, O] uint8`` or ``None``.
    Each stored nibble ``u`` is in [0, 15]; ``w[i, o] = (u[i, o] - z[i // group, o]) * scale[i // group, o]``
    with ``z = zero`` (asymmetric) or ``z = 8`` (symmetric, so values are in [-8, 7]).
    Opt-in K-major layout (``k_major=True``, static): ``packed[O, I // 2]``, ``scale`` and ``zero`` ``[O, I //
    group]`` -- the same arrays transposed, so a packed row holds one output's nibbles along I (the layout of
    the GPU's integer-dot GEMV, ``qmatmul_dp4a.py``; tuned-table format name ``int4_g{group}_{sym|asym}_kmajor``).
    Packing is *half-group*: inside group ``g`` (rows ``g*group .. (g+1)*group - 1``), packed row
    ``g*group/2 + j`` holds row ``g*group + j`` in its low nibble and row ``g*group + group/2 + j`` in its
    high nibble. A kernel that reads one group then multiplies the two nibble planes with two contiguous
    halves of ``x`` -- no interleaving in registers. ``group`` is 64 or 128.

``W8A8Weight`` (int8 weights x int8 activations)
    ``qweight[O, I] int8`` stored transposed (I contiguous: int8 tensor-core instructions need the
    reduction dim contiguous in both operands), ``scale[O] float32``; at call time each row (token) of ``x`` is quantized with its own dynamic
    scale ``sx[m] = max|x[m, :]| / 127`` and the product accumulates in int32:
    ``y[m, o] = (sum_i xq[m, i] * qweight[o, i]) * sx[m] * scale[o]``.

Calibration (choosing better scales than absmax/min-max) belongs elsewhere; ``quantize_*`` here use
round-to-nearest with absmax (symmetric) or min/max (asymmetric) ranges.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Union

import jax
import jax.numpy as jnp

INT4_GROUPS = (64, 128)


class QuantFormatError(ValueError):
    """A quantized weight or its inputs are malformed; the message says what was wrong and what is allowed."""


def _check(cond: bool, msg: str):
    if not cond:
        raise QuantFormatError(msg)


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    qweight: jax.Array  # [I, O] int8 ([O, I] when k_major)
    scale: jax.Array  # [O] float32
    k_major: bool = dataclasses.field(default=False, metadata=dict(static=True))  # qweight stored [O, I]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1 if self.k_major else 0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0 if self.k_major else 1]

    @property
    def layout(self) -> str:
        """The storage layout: "kn" (``qweight[K, N]``, the default) or "nk" (K-major ``qweight[N, K]``)."""
        return "nk" if self.k_major else "kn"

    @property
    def name(self) -> str:
        return "int8_kmajor" if self.k_major else "int8"

    def validate(self):
        _check(isinstance(self.k_major, bool), f"Int8Weight.k_major must be a bool; got {self.k_major!r}")
        want = "[O, I] (k_major)" if self.k_major else "[I, O]"
        _check(self.qweight.ndim == 2 and self.qweight.dtype == jnp.int8,
               f"Int8Weight.qweight must be int8 {want}; got {self.qweight.dtype} {self.qweight.shape}")
        _check(self.scale.shape == (self.out_features,) and jnp.issubdtype(self.scale.dtype, jnp.floating),
               f"Int8Weight.scale must be float [O={self.out_features}]; got {self.scale.dtype} {self.scale.shape}")

    def kn_qweight(self) -> jax.Array:
        """-> ``qweight`` as ``[I, O]`` whatever the storage layout (a transpose when k_major)."""
        return self.qweight.T if self.k_major else self.qweight

    def with_layout(self, k_major: bool) -> "Int8Weight":
        """The same quantized values stored ``[O, I]`` (``k_major=True``) or ``[I, O]``; self when unchanged."""
        if bool(k_major) == self.k_major:
            return self
        return Int8Weight(qweight=self.qweight.T, scale=self.scale, k_major=bool(k_major))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """-> [I, O] (the weight, not its storage layout)."""
        q = self.kn_qweight().astype(jnp.float32)
        return (q * self.scale.astype(jnp.float32)[None, :]).astype(dtype)

    def nbytes(self) -> int:
        return self.qweight.size + 4 * self.scale.size


@dataclasses.dataclass(frozen=True)
class W8A8Weight:
    qweight: jax.Array  # [O, I] int8: K-major (transposed), as int8 tensor-core instructions want B
    scale: jax.Array  # [O] float32

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def name(self) -> str:
        return "w8a8"

    def validate(self):
        _check(self.qweight.ndim == 2 and self.qweight.dtype == jnp.int8,
               f"W8A8Weight.qweight must be int8 [O, I]; got {self.qweight.dtype} {self.qweight.shape}")
        _check(self.scale.shape == (self.out_features,) and jnp.issubdtype(self.scale.dtype, jnp.floating),
               f"W8A8Weight.scale must be float [O={self.out_features}]; got {self.scale.dtype} {self.scale.shape}")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """-> [I, O] (the weight, not its storage layout)."""
        return (self.qweight.astype(jnp.float32).T * self.scale.astype(jnp.float32)[None, :]).astype(dtype)

    def nbytes(self) -> int:
        return self.qweight.size + 4 * self.scale.size


@dataclasses.dataclass(frozen=True)
class Int4Weight:
    packed: jax.Array  # [I // 2, O] uint8, half-group packing (module docstring); [O, I // 2] when k_major
    scale: jax.Array  # [I // group, O] bfloat16; [O, I // group] when k_major
    zero: jax.Array | None  # [I // group, O] uint8 in [0, 15] ([O, I // group] when k_major), or None: symmetric
    group: int = dataclasses.field(default=128, metadata=dict(static=True))
    k_major: bool = dataclasses.field(default=False, metadata=dict(static=True))  # all three stored transposed

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def in_features(self) -> int:
        return 2 * self.packed.shape[1 if self.k_major else 0]

    @property
    def out_features(self) -> int:
        return self.packed.shape[0 if self.k_major else 1]

    @property
    def name(self) -> str:
        return f"int4_g{self.group}_{'sym' if self.symmetric else 'asym'}{'_kmajor' if self.k_major else ''}"

    def validate(self):
        _check(self.group in INT4_GROUPS, f"Int4Weight.group={self.group} is not supported; allowed: {INT4_GROUPS}")
        _check(isinstance(self.k_major, bool), f"Int4Weight.k_major must be a bool; got {self.k_major!r}")
        t = self.k_major
        _check(self.packed.ndim == 2 and self.packed.dtype == jnp.uint8,
               f"Int4Weight.packed must be uint8 {'[O, I/2] (k_major)' if t else '[I/2, O]'}; got "
               f"{self.packed.dtype} {self.packed.shape}")
        _check(self.in_features % self.group == 0,
               f"Int4Weight: I={self.in_features} must be a multiple of group={self.group}")
        gshape = (self.in_features // self.group, self.out_features)
        gshape, gname = (gshape[::-1], "[O, I/group] (k_major)") if t else (gshape, "[I/group, O]")
        _check(self.scale.shape == gshape and jnp.issubdtype(self.scale.dtype, jnp.floating),
               f"Int4Weight.scale must be float {list(gshape)} = {gname}; got {self.scale.dtype} {self.scale.shape}")
        if self.zero is not None:
            _check(self.zero.shape == gshape and self.zero.dtype == jnp.uint8,
                   f"Int4Weight.zero must be uint8 {list(gshape)} = {gname}; got {self.zero.dtype} "
                   f"{self.zero.shape}")

    def with_layout(self, k_major: bool) -> "Int4Weight":
        """The same quantized values with packed / scale / zero stored ``[O, .]`` (``k_major=True``: a packed row
        holds one output's half-group packing along I) or ``[., O]``; self when unchanged."""
        if bool(k_major) == self.k_major:
            return self
        return Int4Weight(packed=self.packed.T, scale=self.scale.T, zero=None if self.zero is None else self.zero.T,
                          group=self.group, k_major=bool(k_major))

    def unpack(self) -> jax.Array:
        """-> nibbles u [I, O] int32 in [0, 15] (undoing the half-group packing, whatever the layout)."""
        if self.k_major:
            return self.with_layout(False).unpack()
        g2 = self.group // 2
        p = self.packed.astype(jnp.int32).reshape(-1, g2, self.out_features)  # [I/group, group/2, O]
        u = jnp.concatenate([p & 0xF, p >> 4], axis=1)  # [I/group, group, O]
        return u.reshape(self.in_features, self.out_features)

    def zero_points(self) -> jax.Array:
        """-> z [I/group, O] float32 (whatever the layout)."""
        if self.k_major:
            return self.with_layout(False).zero_points()
        if self.zero is None:
            return jnp.full(self.scale.shape, 8.0, jnp.float32)
        return self.zero.astype(jnp.float32)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """-> [I, O] (the weight, not its storage layout)."""
        if self.k_major:
            return self.with_layout(False).dequantize(dtype)
        u = self.unpack().astype(jnp.float32).reshape(-1, self.group, self.out_features)
        w = (u - self.zero_points()[:, None, :]) * self.scale.astype(jnp.float32)[:, None, :]
        return w.reshape(self.in_features, self.out_features).astype(dtype)

    def nbytes(self) -> int:
        return self.packed.size + 2 * self.scale.size + (0 if self.zero is None else self.zero.size)


for _cls, _data in ((Int8Weight, ["qweight", "scale"]), (W8A8Weight, ["qweight", "scale"]),
                    (Int4Weight, ["packed", "scale", "zero"])):
    _meta = [f.name for f in dataclasses.fields(_cls) if f.name not in _data]
    jax.tree_util.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)

QuantizedWeight = Union[Int8Weight, W8A8Weight, Int4Weight]
FORMAT_TYPES = (Int8Weight, W8A8Weight, Int4Weight)


# ---- quantizers (round-to-nearest; calibration lives elsewhere) ---------------------------------------------

def _check_float_weight(w) -> jax.Array:
    w = jnp.asarray(w)
    _check(w.ndim == 2 and jnp.issubdtype(w.dtype, jnp.floating),
           f"weight must be a float [I, O] matrix; got {w.dtype} {w.shape}")
    return w.astype(jnp.float32)


def quantize_int8(w, *, k_major: bool = False) -> Int8Weight:
    """Float ``w[I, O]`` -> ``Int8Weight`` (symmetric, one scale per output channel); ``k_major``: store
    ``qweight[O, I]`` (the same values transposed)."""
    w = _check_float_weight(w)
    _check(isinstance(k_major, bool), f"k_major must be a bool; got {k_major!r}")
    q, scale = _int8_arrays(w, k_major=k_major)
    return Int8Weight(qweight=q, scale=scale, k_major=k_major)


# The quantizers' arithmetic, one compiled program per (shape, options): op by op, each small op compiled on its own.
@functools.partial(jax.jit, static_argnames=("k_major",))
def _int8_arrays(w: jax.Array, *, k_major: bool) -> tuple[jax.Array, jax.Array]:
    amax = jnp.max(jnp.abs(w), axis=0)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return (q.T if k_major else q), scale.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("group", "symmetric"))
def _int4_arrays(w: jax.Array, *, group: int, symmetric: bool):
    i, o = w.shape
    wg = w.reshape(i // group, group, o)
    if symmetric:
        amax = jnp.max(jnp.abs(wg), axis=1)
        scale = jnp.where(amax > 0, amax / 7.0, 1.0).astype(jnp.bfloat16)
        sf = scale.astype(jnp.float32)[:, None, :]
        u = jnp.clip(jnp.round(wg / sf), -8, 7) + 8
        zero = None
    else:
        lo = jnp.minimum(jnp.min(wg, axis=1), 0.0)
        hi = jnp.maximum(jnp.max(wg, axis=1), 0.0)
        scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(jnp.bfloat16)
        sf = scale.astype(jnp.float32)
        zf = jnp.clip(jnp.round(-lo / sf), 0, 15)
        u = jnp.clip(jnp.round(wg / sf[:, None, :]) + zf[:, None, :], 0, 15)
        zero = zf.astype(jnp.uint8)
    return pack_int4(u.reshape(i, o).astype(jnp.int32), group), scale, zero


def quantize_w8a8(w) -> W8A8Weight:
    """Float ``w[I, O]`` -> ``W8A8Weight`` (activations are quantized per token at call time)."""
    q = quantize_int8(w)
    return W8A8Weight(qweight=q.qweight.T, scale=q.scale)


def pack_int4(u: jax.Array, group: int) -> jax.Array:
    """Nibbles ``u[I, O]`` (ints in [0, 15]) -> ``packed[I/2, O] uint8`` in half-group order."""
    i, o = u.shape
    u = u.astype(jnp.uint8).reshape(i // group, 2, group // 2, o)
    return (u[:, 0] | (u[:, 1] << 4)).reshape(i // 2, o)


def quantize_int4(w, *, group: int = 128, symmetric: bool = True, k_major: bool = False) -> Int4Weight:
    """Float ``w[I, O]`` -> ``Int4Weight`` with groups of ``group`` rows along I (64 or 128); ``k_major``: stored
    transposed (``Int4Weight.with_layout``).

    symmetric: ``scale = max|w| / 7`` per group, values in [-8, 7] (stored +8); asymmetric: ``scale =
    (max - min) / 15`` and an integer zero point ``z = round(-min / scale)`` in [0, 15].
    """
    w = _check_float_weight(w)
    _check(group in INT4_GROUPS, f"group={group} is not supported; allowed: {INT4_GROUPS}")
    i, o = w.shape
    _check(i % group == 0, f"I={i} must be a multiple of group={group}")
    _check(isinstance(k_major, bool), f"k_major must be a bool; got {k_major!r}")
    packed, scale, zero = _int4_arrays(w, group=group, symmetric=bool(symmetric))
    return Int4Weight(packed=packed, scale=scale, zero=zero, group=group).with_layout(k_major)


K_MAJOR_CHOICES = (False, True, "auto", "wide")


def check_k_major_choice(k_major) -> None:
    """Raises ``QuantFormatError`` unless ``k_major`` is one of ``K_MAJOR_CHOICES`` (bools by identity)."""
    _check(any(k_major is c or (isinstance(c, str) and k_major == c) for c in K_MAJOR_CHOICES),
           f"k_major={k_major!r}; allowed: False ([I, O]), True ([O, I]), 'auto' (per weight by format and shape) or "
           f"'wide' ([O, I] where O >= 2 I)")


K_MAJOR_FORMATS = ("int8", "int4")


def check_k_major(fmt: str, k_major: bool | str) -> None:
    """Raises ``QuantFormatError`` unless ``k_major`` is one of ``K_MAJOR_CHOICES`` and, when not False, ``fmt``
    is one of ``K_MAJOR_FORMATS`` (weight-only int8 or int4)."""
    check_k_major_choice(k_major)
    _check(not k_major or fmt in K_MAJOR_FORMATS,
           f"k_major (the K-major [O, I] weight layout) is for fmt in {K_MAJOR_FORMATS} only; got fmt={fmt!r}")


def resolve_k_major(k_major: bool | str, in_features: int, out_features: int, fmt: str = "int8") -> bool:
    """The storage of one ``[I, O]`` weight: True / False as given; ``"auto"``: int8 K-major (``[O, I]``) unless
    ``I > O`` (on the H100 XLA's int8 dot read the wide K-major weights -- qkv, o, gate_up -- and the tall
    ``[I, O]`` down_proj, 13696 -> 4096, fastest at decode sizes); int4 K-major for every weight (the one-row
    integer-dot GEMV, its activation digits from one launch: all-K-major int4 decoded at 3.53 ms/token on the H100
    against 3.78 for the session-12 mix that kept only gate_up K-major, the same run's bf16 6.77; session 14,
    experiments/results/qmatmul_h100_notes.md); ``"wide"``: K-major where ``O >= 2 I`` (gate_up), what ``"auto"``
    meant for int4 until session 14 -- int4 checkpoints that recorded ``"auto"`` then load with it
    (``autoglm_jax.loading.stored_quantization``)."""
    check_k_major_choice(k_major)
    if k_major == "wide":
        return out_features >= 2 * in_features
    if k_major == "auto":
        return fmt == "int4" or in_features <= out_features
    return bool(k_major)


def quantize(w, fmt: str, *, group: int = 128, symmetric: bool = True,
             k_major: bool | str = False) -> QuantizedWeight:
    """Dispatch by format name: ``"int8"`` (with ``k_major``: False, True or ``"auto"``, see
    ``resolve_k_major``), ``"int4"`` (with ``group``, ``symmetric``, ``k_major``) or ``"w8a8"`` (always stored
    [O, I])."""
    check_k_major(fmt, k_major)
    if fmt == "int8":
        w = _check_float_weight(w)
        return quantize_int8(w, k_major=resolve_k_major(k_major, *w.shape))
    if fmt == "w8a8":
        return quantize_w8a8(w)
    if fmt == "int4":
        w = _check_float_weight(w)
        return quantize_int4(w, group=group, symmetric=symmetric, k_major=resolve_k_major(k_major, *w.shape, "int4"))
    raise QuantFormatError(f"unknown quantization format {fmt!r}; allowed: 'int8', 'int4', 'w8a8'")


def quantize_activations(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token dynamic int8: ``x[M, I]`` -> (``xq[M, I] int8``, ``sx[M, 1] float32``), x ~ xq * sx."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    sx = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(xf / sx), -127, 127).astype(jnp.int8)
    return xq, sx
