"""Fake quantization (straight-through estimator, LSQ scale gradients) and QAT through the training step, with
export to real quantized weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.quant import PTQConfig, fake_quant, fake_quant_activations, fake_quant_weight
from autoglm_jax.quant.qat import init_qat, qat_export, qat_train


def test_fake_quant_forward_hand_checked():
    x = jnp.array([0.26, -0.34, 5.0, -5.0, 0.04])
    y = fake_quant(x, jnp.float32(0.1), jnp.float32(0.0), -8, 7)
    np.testing.assert_allclose(np.asarray(y), [0.3, -0.3, 0.7, -0.8, 0.0], atol=1e-6)


def test_ste_gradient_identity_inside_zero_outside():
    s = jnp.float32(0.1)
    # grid [-8, 7] * 0.1: inside means round(x / s) in [-8, 7]
    inside = jnp.array([0.0, 0.26, -0.31, 0.73, -0.84, 0.5])
    outside = jnp.array([0.76, 1.5, -0.86, -3.0, 100.0])
    f = lambda x: jnp.sum(fake_quant(x, s, jnp.float32(0.0), -8, 7) * jnp.arange(1.0, x.size + 1))
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(inside)), np.arange(1.0, inside.size + 1))
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(outside)), np.zeros(outside.size))
    # bfloat16 in -> bfloat16 gradient, same mask
    gb = jax.grad(lambda x: jnp.sum(fake_quant(x, s, jnp.float32(0.0), -8, 7).astype(jnp.float32)))(
        jnp.array([0.2, 2.0], jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16 and gb.tolist() == [1.0, 0.0]
    # with a zero point (asymmetric grid [0, 15], z = 3 -> values -0.3 .. 1.2)
    g = jax.grad(lambda x: jnp.sum(fake_quant(x, s, jnp.float32(3.0), 0, 15)))(jnp.array([-0.2, 1.1, -0.5, 1.4]))
    np.testing.assert_array_equal(np.asarray(g), [1.0, 1.0, 0.0, 0.0])


def test_lsq_scale_gradient_hand_checked():
    x = jnp.array([0.26, 5.0, -0.84, -2.0])
    # d/ds: inside round(v) - v: (3 - 2.6) + (-8 - -8.4); outside qmax - z = 7 and qmin - z = -8
    ds = jax.grad(lambda s: jnp.sum(fake_quant(x, s, jnp.float32(0.0), -8, 7)))(jnp.float32(0.1))
    np.testing.assert_allclose(float(ds), 0.4 + 0.4 + 7.0 - 8.0, atol=1e-5)
    # per-channel scales get their own channel's sum; grad_scale multiplies it
    xs = jnp.array([[0.26, 5.0], [0.26, 5.0]])
    dss = jax.grad(lambda s: jnp.sum(fake_quant(xs, s, jnp.zeros(()), -8, 7, 0.5)))(jnp.array([[0.1, 0.1]]))
    np.testing.assert_allclose(np.asarray(dss), [[0.4, 7.0]], atol=1e-5)


def test_fake_quant_weight_equals_the_exported_format():
    from autoglm_jax.quant import quantize_weight, weight_qparams
    from autoglm_jax.quant.fake_quant import group_view, weight_range
    w = jax.random.normal(jax.random.key(0), (128, 40)) * 0.05
    for fmt, sym in (("int8", True), ("int4", True), ("int4", False), ("w8a8", True)):
        lo, hi = weight_range(group_view(w, fmt, 64), sym)
        s, z = weight_qparams(lo * 0.9, hi * 0.9, fmt, sym)  # clipped: some values saturate
        fq = fake_quant_weight(w, s, z, fmt, 64)
        np.testing.assert_allclose(np.asarray(quantize_weight(w, s, z, fmt, 64, symmetric=sym).dequantize()),
                                   np.asarray(fq), rtol=0, atol=1e-7)
    xa = jnp.array([[0.5, -1.0, 0.25]])
    np.testing.assert_allclose(np.asarray(fake_quant_activations(xa)), [[64 / 127, -1.0, 32 / 127]], atol=1e-6)


@pytest.fixture(scope="module")
def small_model():
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.model import GLMForCausalLM
    cfg = GLMConfig.from_preset("tiny", num_layers=2, vocab_size=256, hidden_size=128, intermediate_size=192,
                                num_heads=2, num_kv_heads=1)
    return GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0))


def test_qat_trains_and_exports_real_quantized_weights(small_model):
    from autoglm_jax.model.linear import Linear
    from autoglm_jax.model.quantized_linear import QuantizedLinear
    from autoglm_jax.train import TokenBatches, TrainConfig
    from kernels_pallas.quant_formats import Int4Weight
    cfg = PTQConfig(method="int4", group=64, symmetric=False, keep_float=("lm_head", "layers.0.mlp.*"))
    stream = np.tile(np.arange(1, 33, dtype=np.int32), 20)  # a repeating pattern: learnable in a few steps
    tc = TrainConfig(seq_len=32, batch_size=4, total_steps=6, warmup_steps=1, learning_rate=1e-2, log_every=1)
    run = jax.jit(lambda s, i: nnx.merge(nnx.graphdef(small_model), s)(i))
    ref_logits = run(nnx.state(small_model), jnp.asarray(stream[None, :32]))
    res = qat_train(small_model, cfg, tc, TokenBatches(stream, seq_len=32, batch_size=4, seed=0), progress=False)
    losses = [h["loss"] for h in res.history]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
    np.testing.assert_array_equal(np.asarray(run(nnx.state(small_model), jnp.asarray(stream[None, :32]))),
                                  np.asarray(ref_logits))  # the float model was not touched (nor donated)
    params = res.state.params
    ratio = params["qat"]["layers.attn.qkv_proj"]["ratio"]
    assert float(jnp.max(jnp.abs(ratio - 1.0))) > 0  # the scales were trained
    model, qdict = qat_export(res.fwd, params, dtype="float32")
    assert qdict["fmt"] == "int4" and qdict["symmetric"] is False
    assert set(qdict["keep_float"]) == {"lm_head", "layers.0.mlp.gate_up_proj", "layers.0.mlp.down_proj"}
    assert isinstance(model.layers[0].mlp.down_proj, Linear) and isinstance(model.lm_head, Linear)
    q = model.layers[1].mlp.down_proj
    assert isinstance(q, QuantizedLinear) and isinstance(q.weight(), Int4Weight)
    assert q.qweight[...].dtype == jnp.uint8 and q.zero is not None
    ids = jnp.asarray(stream[None, 3:35])
    fq_logits = jax.jit(res.fwd)(params, ids)
    real_logits = jax.jit(lambda s, i: nnx.merge(nnx.graphdef(model), s)(i))(nnx.state(model), ids)  # kernels
    assert float(jnp.max(jnp.abs(fq_logits - real_logits))) < 1e-3 * float(jnp.max(jnp.abs(fq_logits)))


def test_qat_rejects_what_it_cannot_do(small_model):
    from autoglm_jax.quant import PTQError
    with pytest.raises(PTQError, match="does not divide"):
        init_qat(small_model, PTQConfig(method="int4", group=128, keep_float=()))  # down_proj K = 192
    with pytest.raises(PTQError, match="dynamic"):
        init_qat(small_model, PTQConfig(method="w8a8", activations="static"))
