"""Post-training quantization: per-format error bounds on hand-checked cases, observers on data with outliers,
calibration statistics, and the quantized tiny model against float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.quant import (ActStats, Observer, PTQConfig, PTQError, activation_clip, calibrate, parse_observer,
                               quantize, quantize_weight, weight_clip_range, weight_qparams)
from autoglm_jax.quant.observers import histogram_update
from kernels_pallas.quant_formats import Int4Weight, Int8Weight, W8A8Weight
from kernels_pallas.quant_formats import quantize as rtn_quantize


def _q(w, fmt, obs="absmax", group=64, symmetric=True):
    lo, hi = weight_clip_range(w, parse_observer(obs), fmt, group=group, symmetric=symmetric)
    s, z = weight_qparams(lo, hi, fmt, symmetric)
    return quantize_weight(w, s, z, fmt, group, symmetric=symmetric)


# ---- formats: hand-checked values and error bounds -----------------------------------------------------------

def test_int8_hand_checked():
    w = jnp.array([[1.0, -0.5], [0.5, 2.54], [-1.27, 0.3]], jnp.float32)  # column amax 1.27, 2.54 -> 0.01, 0.02
    q = _q(w, "int8")
    assert isinstance(q, Int8Weight)
    np.testing.assert_allclose(np.asarray(q.scale), [0.01, 0.02], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q.qweight), [[100, -25], [50, 127], [-127, 15]])
    np.testing.assert_allclose(np.asarray(q.dequantize()), np.asarray(w), atol=1e-6)


def test_int4_symmetric_and_asymmetric_hand_checked():
    col = np.zeros(64, np.float32)
    col[:4] = [0.7, -0.35, 0.04, -0.8]  # amax 0.8 -> scale bf16(0.8 / 7)
    w = jnp.asarray(np.stack([col, col / 2], axis=1))
    q = _q(w, "int4", group=64)
    assert isinstance(q, Int4Weight) and q.zero is None and q.group == 64
    s = float(jnp.asarray(0.8 / 7, jnp.bfloat16).astype(jnp.float32))
    assert float(q.scale[0, 0].astype(jnp.float32)) == s
    u = np.asarray(q.unpack())[:4, 0] - 8
    np.testing.assert_array_equal(u, np.round(col[:4] / s).clip(-8, 7))  # [6, -3, 0, -7]
    np.testing.assert_array_equal(u, [6, -3, 0, -7])
    # asymmetric: range [-0.3, 1.2] -> scale 0.1 (bf16), zero point round(0.3 / 0.1) = 3
    col2 = np.zeros(64, np.float32)
    col2[:3] = [-0.3, 1.2, 0.55]
    qa = _q(jnp.asarray(col2[:, None]), "int4", group=64, symmetric=False)
    assert qa.zero is not None and int(qa.zero[0, 0]) == 3
    sa = float(qa.scale[0, 0].astype(jnp.float32))
    assert abs(sa - 0.1) < 1e-3
    assert np.abs(np.asarray(qa.dequantize())[:, 0] - col2).max() <= sa / 2 + 1e-6


@pytest.mark.parametrize("fmt,group,symmetric", [("int8", 0, True), ("w8a8", 0, True), ("int4", 64, True),
                                                 ("int4", 128, True), ("int4", 128, False)])
def test_error_bound_and_matches_round_to_nearest(fmt, group, symmetric):
    w = jax.random.normal(jax.random.key(0), (256, 96), jnp.float32) * 0.05
    q = _q(w, fmt, group=group or 128, symmetric=symmetric)
    ref = rtn_quantize(w, fmt, group=group or 128, symmetric=symmetric)  # quant_formats' own quantizer
    assert type(q) is type(ref)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # |w - dequant| <= scale / 2 everywhere (nothing clips with absmax). Asymmetric int4: the integer zero
    # point shifts the grid by up to scale / 2 and the bfloat16 scale may shrink the range by 15 * 2^-9 scale,
    # so the ends of the range can be off by up to ~1.03 scale.
    if isinstance(q, Int4Weight):
        half = np.repeat(np.asarray(q.scale.astype(jnp.float32)), group, axis=0) / 2
    else:
        half = np.asarray(q.scale)[None, :] / 2
    bound = half * (1 + 1e-5) if symmetric else half * 2.07
    err = np.abs(np.asarray(q.dequantize()) - np.asarray(w))
    assert (err <= bound).all()
    assert np.median(err / half) < 0.6  # mostly rounding noise, not clipping
    if isinstance(q, W8A8Weight):
        assert q.qweight.shape == (96, 256)


# ---- observers -----------------------------------------------------------------------------------------------

def test_weight_observers_with_an_outlier():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (512, 4)).astype(np.float32)
    w[7, 0] = 1.0  # 50 sigma
    lo_a, hi_a = weight_clip_range(jnp.asarray(w), Observer(kind="absmax"), "int8")
    lo_p, hi_p = weight_clip_range(jnp.asarray(w), parse_observer("percentile:99"), "int8")
    assert float(hi_a[0, 0]) == 1.0 and float(lo_a[0, 0]) == -1.0  # absmax keeps the outlier
    assert float(hi_p[0, 0]) < 0.1  # the percentile clips it (99th pct of |N(0, .02)| ~ 0.05)
    # MSE: never worse than absmax (ratio 1 is a candidate), strictly better on gaussian int4 groups
    g = jnp.asarray(rng.normal(0, 0.02, (1024, 32)).astype(np.float32))
    errs = {}
    for kind in ("absmax", "mse"):
        lo, hi = weight_clip_range(g, Observer(kind=kind), "int4", group=128)
        s, z = weight_qparams(lo, hi, "int4")
        errs[kind] = float(jnp.sum(jnp.square(quantize_weight(g, s, z, "int4", 128).dequantize() - g)))
        if kind == "mse":
            assert float(jnp.mean(hi / jnp.max(jnp.abs(g.reshape(8, 128, 32)), axis=1))) < 0.99
    assert errs["mse"] < 0.97 * errs["absmax"]


def test_activation_observers_with_outliers():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1.0, 200_000).astype(np.float32)
    x[:2] = [60.0, -55.0]
    stats = ActStats.empty()
    for chunk in np.split(x, 4):  # streamed: merged batch by batch
        stats.merge(*jax.device_get(histogram_update(jnp.asarray(chunk))))
    assert stats.count == x.size and stats.amax == 60.0
    c_abs = activation_clip(stats, Observer(kind="absmax"))
    c_pct = activation_clip(stats, parse_observer("percentile:99.99"))
    c_mse = activation_clip(stats, Observer(kind="mse"))
    assert c_abs == 60.0
    assert 3.5 < c_pct < 4.5  # 99.99th percentile of |N(0,1)| = 3.89, within a histogram bin (1.1%)
    assert 4.0 < c_mse < 0.8 * 60.0  # clips the two outliers, keeps the bulk
    # masked values are not counted
    h, a, n = histogram_update(jnp.asarray([[1.0, 100.0]]), jnp.asarray([[1.0, 0.0]]))
    assert float(n) == 1.0 and float(a) == 1.0 and float(jnp.sum(h)) == 1.0


def test_bad_observers_and_configs():
    with pytest.raises(ValueError, match="unknown observer"):
        parse_observer("kl")
    with pytest.raises(ValueError, match="percentile"):
        parse_observer("percentile:0")
    with pytest.raises(PTQError, match="unknown quantization method"):
        PTQConfig(method="int3")
    with pytest.raises(PTQError, match="group size 32"):
        PTQConfig(method="int4", group=32)
    with pytest.raises(PTQError, match="static"):
        PTQConfig(method="int8", activations="static")
    with pytest.raises(PTQError, match=r"K-major.*methods \['int8', 'int4'\] only"):
        PTQConfig(method="w8a8", k_major=True)


def test_int8_k_major_ptq_is_the_kn_one_transposed():
    w = jax.random.normal(jax.random.key(8), (96, 40)) * jnp.linspace(0.1, 1.0, 40)[None, :]
    for obs in ("absmax", "mse"):
        lo, hi = weight_clip_range(w, parse_observer(obs), "int8")
        s, z = weight_qparams(lo, hi, "int8", True)
        kn, nk = (quantize_weight(w, s, z, "int8", k_major=k) for k in (False, True))
        assert nk.k_major and nk.qweight.shape == (40, 96)
        np.testing.assert_array_equal(np.asarray(nk.qweight), np.asarray(kn.qweight).T)
        np.testing.assert_array_equal(np.asarray(nk.dequantize()), np.asarray(kn.dequantize()))
    cfg = PTQConfig(method="int8", k_major=True)
    assert cfg.label == "int8_kmajor" and PTQConfig(method="int8").label == "int8"
    from autoglm_jax.quant.ptq import quantization_dict
    assert quantization_dict(cfg, [])["k_major"] is True and "k_major" not in quantization_dict(
        PTQConfig(method="int8"), [])


def test_int8_k_major_auto_ptq_resolves_by_shape():
    from autoglm_jax.quant.ptq import quantization_dict
    for shape, want in (((40, 96), True), ((96, 40), False)):
        w = jax.random.normal(jax.random.key(9), shape)
        lo, hi = weight_clip_range(w, parse_observer("absmax"), "int8")
        s, z = weight_qparams(lo, hi, "int8", True)
        kn, auto = (quantize_weight(w, s, z, "int8", k_major=k) for k in (False, "auto"))
        assert auto.k_major is want and auto.qweight.shape == (shape[::-1] if want else shape)
        np.testing.assert_array_equal(np.asarray(auto.kn_qweight()), np.asarray(kn.qweight))
    cfg = PTQConfig(method="int8", k_major="auto")
    assert cfg.label == "int8_auto" and quantization_dict(cfg, [])["k_major"] == "auto"
    for bad in ("yes", 1, "nk", None):
        with pytest.raises(PTQError, match="allowed: False.*True.*'auto'"):
            PTQConfig(method="int8", k_major=bad)
    with pytest.raises(PTQError, match=r"K-major.*methods \['int8', 'int4'\] only"):
        PTQConfig(method="w8a8", k_major="auto")


# ---- the tiny model -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from autoglm_jax import from_pretrained
    return from_pretrained("tiny")


def _logits(model, ids):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(state, ids)


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def test_quantized_tiny_model_logits_close_to_float(tiny):
    ids = jnp.asarray(np.random.default_rng(0).integers(1, tiny.cfg.vocab_size, (2, 48)), jnp.int32)
    ref = _logits(tiny, ids)
    stats = calibrate(tiny, list(np.asarray(ids)), seq_len=48, batch_size=2, progress=False)
    assert set(stats) >= {"layers.0.attn.qkv_proj", "layers.3.mlp.down_proj", "lm_head"}
    d, f = tiny.cfg.hidden_size, tiny.cfg.intermediate_size  # every value of every token, once
    assert stats["layers.0.attn.qkv_proj"].count == 2 * 48 * d and stats["layers.3.mlp.down_proj"].count == 2 * 48 * f
    with pytest.raises(PTQError, match="does not divide"):
        quantize(nnx.clone(tiny), PTQConfig(method="int4", group=128))  # down_proj K = 688
    bounds = {"int8": 0.02, "int4": 0.12, "w8a8": 0.04, "w8a8s": 0.06}
    for name, cfg in {"int8": PTQConfig(method="int8"),
                      "int4": PTQConfig(method="int4", group=64, keep_indivisible=True),
                      "w8a8": PTQConfig(method="w8a8"),
                      "w8a8s": PTQConfig(method="w8a8", activations="static", act_observer="percentile:99.99")
                      }.items():
        model = nnx.clone(tiny)
        report = quantize(model, cfg, act_stats=stats)
        assert "lm_head" in report.kept_float and "layers.0.attn.qkv_proj" in report.quantized
        if name == "int4":
            assert all("down_proj" in p for p in report.kept_float if p != "lm_head")
            assert "layers.2.mlp.down_proj" in report.quantization["keep_float"]
        if name == "w8a8s":
            assert report.quantization["static_activations"] is True
            s = model.layers[0].attn.o_proj.act_scale[...]
            assert 0 < float(s[0]) * 127 <= stats["layers.0.attn.o_proj"].amax * 1.0001
        err = _rel(_logits(model, ids), ref)
        assert 0 < err < bounds[name], (name, err)


def test_static_activation_scale_in_quantized_matmul():
    from kernels_pallas.quant_formats import QuantFormatError
    from kernels_pallas.quantized_matmul import quantized_matmul
    w = W8A8Weight(qweight=jnp.array([[1, 0, 0], [0, 1, 1]], jnp.int8), scale=jnp.array([1.0, 0.5]))
    x = jnp.array([[0.5, -1.0, 2.0]])  # / 0.01 -> [50, -100, 200 -> saturates at 127]
    y = quantized_matmul(x, w, act_scale=jnp.array([0.01]), impl="reference")
    np.testing.assert_allclose(np.asarray(y), [[0.5, (-100 + 127) * 0.01 * 0.5]], rtol=1e-6)
    y_xla = quantized_matmul(x, w, act_scale=jnp.array(0.01), impl="xla")
    np.testing.assert_allclose(np.asarray(y_xla), np.asarray(y), rtol=1e-6)
    dyn = quantized_matmul(x, w, impl="reference")  # dynamic: scale 2 / 127, nothing saturates
    np.testing.assert_allclose(np.asarray(dyn), [[0.5, 0.5]], atol=2 / 127)
    with pytest.raises(QuantFormatError, match="W8A8 weights only"):
        quantized_matmul(x, Int8Weight(qweight=jnp.ones((3, 2), jnp.int8), scale=jnp.ones(2)),
                         act_scale=jnp.array([0.01]))
    with pytest.raises(QuantFormatError, match="scalar or \\[1\\]"):
        quantized_matmul(x, w, act_scale=jnp.ones((3,)))
