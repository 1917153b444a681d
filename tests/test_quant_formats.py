"""Quantized weight formats: packing layout, quantization error bounds, pytree behaviour, validation."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.quant_formats import (Int4Weight, Int8Weight, QuantFormatError, W8A8Weight, pack_int4,
                                          quantize, quantize_activations, quantize_int4, quantize_int8,
                                          resolve_k_major)


def test_int4_half_group_packing_layout():
    """Packed row g*G/2 + j holds row g*G + j (low nibble) and row g*G + G/2 + j (high nibble)."""
    rng = np.random.default_rng(0)
    group, i, o = 64, 192, 5
    u = rng.integers(0, 16, (i, o))
    packed = np.asarray(pack_int4(jnp.asarray(u), group))
    assert packed.shape == (i // 2, o) and packed.dtype == np.uint8
    for g in range(i // group):
        for j in range(group // 2):
            row = packed[g * group // 2 + j]
            np.testing.assert_array_equal(row & 0xF, u[g * group + j])
            np.testing.assert_array_equal(row >> 4, u[g * group + group // 2 + j])
    w = Int4Weight(packed=jnp.asarray(packed), scale=jnp.ones((i // group, o), jnp.bfloat16), zero=None, group=group)
    np.testing.assert_array_equal(np.asarray(w.unpack()), u)


@pytest.mark.parametrize("group,symmetric", [(64, True), (128, True), (64, False), (128, False)])
def test_int4_error_bound_and_range(group, symmetric):
    w = jax.random.normal(jax.random.key(group), (256, 48), jnp.float32) * 0.1 + (0 if symmetric else 0.05)
    q = quantize_int4(w, group=group, symmetric=symmetric)
    q.validate()
    assert q.symmetric == symmetric and q.name == f"int4_g{group}_{'sym' if symmetric else 'asym'}"
    wn = np.asarray(w).reshape(256 // group, group, 48)
    s = np.asarray(q.scale.astype(jnp.float32))[:, None, :]
    err = np.abs(np.asarray(q.dequantize()).reshape(wn.shape) - wn)
    # half a step, plus (asymmetric) the range edge moved by the bf16 rounding of the scale: 15 steps * 2**-8
    bound = 0.5 * s * 1.001 + (0 if symmetric else 15 * 2.0 ** -8 * s) + 1e-7
    assert np.all(err <= bound), "round-to-nearest error must stay within half a step"
    if not symmetric:
        z = np.asarray(q.zero)
        assert z.min() >= 0 and z.max() <= 15


def test_int8_per_channel_error_bound():
    w = jax.random.normal(jax.random.key(1), (128, 40)) * jnp.linspace(0.01, 1.0, 40)[None, :]
    q = quantize_int8(w)
    s = np.asarray(q.scale)
    np.testing.assert_allclose(s, np.abs(np.asarray(w)).max(0) / 127, rtol=1e-6)
    assert np.all(np.abs(np.asarray(q.dequantize()) - np.asarray(w)) <= 0.5 * s[None, :] * (1 + 1e-5))
    assert np.abs(np.asarray(q.qweight, np.int32)).max() == 127


def test_activation_quantization_per_token():
    x = jax.random.normal(jax.random.key(2), (3, 64)) * jnp.array([[0.1], [1.0], [30.0]])
    xq, sx = quantize_activations(x)
    assert xq.dtype == jnp.int8 and sx.shape == (3, 1)
    np.testing.assert_allclose(np.asarray(sx[:, 0]), np.abs(np.asarray(x)).max(1) / 127, rtol=1e-6)
    assert np.all(np.abs(np.asarray(xq, np.float32) * np.asarray(sx) - np.asarray(x)) <= 0.5 * np.asarray(sx) + 1e-6)


@pytest.mark.parametrize("fmt,kw", [("int8", {}), ("w8a8", {}), ("int4", dict(group=64, symmetric=False))])
def test_formats_are_pytrees_that_pass_through_jit(fmt, kw):
    w = jax.random.normal(jax.random.key(3), (128, 16))
    q = quantize(w, fmt, **kw)
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert len(leaves) == (3 if fmt == "int4" else 2)
    q2 = jax.jit(lambda q: q)(q)
    assert type(q2) is type(q)
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(q.dequantize()))
    if fmt == "int4":
        assert q2.group == 64  # static meta field, not a traced leaf


def test_symmetric_int4_has_no_zero_leaf():
    q = quantize_int4(jax.random.normal(jax.random.key(4), (128, 8)), group=128)
    assert q.zero is None and len(jax.tree_util.tree_leaves(q)) == 2


def test_bad_formats_raise_clear_errors():
    w = jax.random.normal(jax.random.key(5), (192, 8))
    with pytest.raises(QuantFormatError, match="multiple of group=128"):
        quantize_int4(w, group=128)
    with pytest.raises(QuantFormatError, match="allowed: \\(64, 128\\)"):
        quantize_int4(w, group=32)
    with pytest.raises(QuantFormatError, match="float"):
        quantize_int8(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(QuantFormatError, match="unknown quantization format"):
        quantize(w, "int3")
    q = quantize_int4(w, group=64, symmetric=False)
    with pytest.raises(QuantFormatError, match="zero must be uint8"):
        Int4Weight(packed=q.packed, scale=q.scale, zero=q.zero.astype(jnp.int32), group=64).validate()
    with pytest.raises(QuantFormatError, match=r"scale must be float \[3, 8\]"):
        Int4Weight(packed=q.packed, scale=q.scale[:2], zero=None, group=64).validate()
    with pytest.raises(QuantFormatError, match="packed must be uint8"):
        Int4Weight(packed=q.packed.astype(jnp.int8), scale=q.scale, zero=None, group=64).validate()
    q8 = quantize_int8(w)
    with pytest.raises(QuantFormatError, match="scale must be float"):
        W8A8Weight(qweight=q8.qweight.T, scale=q8.scale[:-1]).validate()
    with pytest.raises(QuantFormatError, match="qweight must be int8"):
        Int8Weight(qweight=q8.qweight.astype(jnp.uint8), scale=q8.scale).validate()


# ------------------------------------------------------------------- Int8Weight, K-major layout [O, I]
@pytest.mark.parametrize("i,o", [(256, 200), (96, 130), (13, 7)])
def test_int8_k_major_is_the_kn_weight_transposed(i, o):
    w = jax.random.normal(jax.random.key(i + o), (i, o)) * jax.random.uniform(jax.random.key(o), (o,), minval=0.01)
    kn, nk = quantize_int8(w), quantize(w, "int8", k_major=True)
    nk.validate()
    assert (kn.k_major, nk.k_major, kn.layout, nk.layout) == (False, True, "kn", "nk")
    assert nk.qweight.shape == (o, i) and (nk.in_features, nk.out_features) == (kn.in_features, kn.out_features)
    assert (kn.name, nk.name) == ("int8", "int8_kmajor") and nk.nbytes() == kn.nbytes()
    np.testing.assert_array_equal(np.asarray(nk.qweight), np.asarray(kn.qweight).T)
    np.testing.assert_array_equal(np.asarray(nk.scale), np.asarray(kn.scale))
    np.testing.assert_array_equal(np.asarray(nk.dequantize()), np.asarray(kn.dequantize()))  # [I, O] both
    np.testing.assert_array_equal(np.asarray(nk.kn_qweight()), np.asarray(kn.qweight))
    back = nk.with_layout(False)
    assert not back.k_major and nk.with_layout(True) is nk
    np.testing.assert_array_equal(np.asarray(back.qweight), np.asarray(kn.qweight))
    np.testing.assert_array_equal(np.asarray(kn.with_layout(True).qweight), np.asarray(nk.qweight))


@pytest.mark.parametrize("i,o,want", [(96, 130, True), (128, 128, True), (256, 200, False), (13, 7, False)])
def test_int8_k_major_auto_resolves_by_shape(i, o, want):
    """``k_major="auto"``: K-major for a wide (or square) [I <= O] weight, [I, O] for a tall one; same values."""
    w = jax.random.normal(jax.random.key(i * o), (i, o))
    auto, kn = quantize(w, "int8", k_major="auto"), quantize(w, "int8")
    auto.validate()
    assert auto.k_major is want and resolve_k_major("auto", i, o) is want
    assert auto.qweight.shape == ((o, i) if want else (i, o))
    np.testing.assert_array_equal(np.asarray(auto.kn_qweight()), np.asarray(kn.qweight))
    np.testing.assert_array_equal(np.asarray(auto.dequantize()), np.asarray(kn.dequantize()))
    assert (resolve_k_major(True, i, o), resolve_k_major(False, i, o)) == (True, False)


def test_int8_k_major_bad_values_and_formats():
    w = jax.random.normal(jax.random.key(9), (64, 16))
    for bad in ("yes", 1, 0, "nk", None):
        with pytest.raises(QuantFormatError, match="allowed: False.*True.*'auto'"):
            quantize(w, "int8", k_major=bad)
        with pytest.raises(QuantFormatError, match="allowed: False.*True.*'auto'"):
            resolve_k_major(bad, 64, 16)
    with pytest.raises(QuantFormatError, match=r"k_major.*only; got fmt='w8a8'"):
        quantize(w, "w8a8", k_major="auto")


def test_int8_k_major_is_static_pytree_metadata():
    nk = quantize_int8(jax.random.normal(jax.random.key(6), (64, 24)), k_major=True)
    leaves, treedef = jax.tree_util.tree_flatten(nk)
    assert len(leaves) == 2 and treedef != jax.tree_util.tree_structure(nk.with_layout(False))
    out = jax.jit(lambda q: q)(nk)
    assert out.k_major is True and out.qweight.shape == (24, 64)
    # k_major is a static meta field: jit specializes on it (in_features is a trace-time Python int)
    assert jax.jit(lambda q: q.dequantize())(nk).shape == (64, 24)


def test_int8_k_major_errors_name_the_layout():
    w = jax.random.normal(jax.random.key(7), (128, 16))
    nk = quantize_int8(w, k_major=True)
    with pytest.raises(QuantFormatError, match=r"scale must be float \[O=16\]"):
        Int8Weight(qweight=nk.qweight, scale=nk.scale[:-1], k_major=True).validate()
    with pytest.raises(QuantFormatError, match=r"int8 \[O, I\] \(k_major\)"):
        Int8Weight(qweight=nk.qweight.astype(jnp.int32), scale=nk.scale, k_major=True).validate()
    with pytest.raises(QuantFormatError, match=r"scale must be float \[O=128\]"):  # an [O, I] array read as [I, O]
        Int8Weight(qweight=nk.qweight, scale=nk.scale).validate()
    with pytest.raises(QuantFormatError, match=r"k_major.*only; got fmt='w8a8'"):
        quantize(w, "w8a8", k_major=True)
