"""Activation digits written by the producing kernel (``kernels_pallas.act_digits``): ``add_rms_norm`` with
``digits`` and ``swiglu.swiglu_digits`` write the same digits as the quantized matmul's own preps compute from their
outputs (``quantize_rows.split_rows``, ``qmatmul_dp4a.digit_planes_pallas``), ``quantized_matmul`` given them equals
the call without them, ``digits_layout`` names the layout a call's path computes, and a bf16 GLM quantized int4 /
int8 decodes with the digits taken from the norms and SwiGLU as it does without. Fresh random inputs, D not a power
of two (masked columns), int4 group counts not powers of two (masked groups)."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.act_digits import SPLIT_STEPS, ActDigits
from kernels_pallas.add_rms_norm import add_rms_norm, add_rms_norm_reference
from kernels_pallas.qmatmul_dp4a import digit_planes_pallas
from kernels_pallas.quant_formats import QuantFormatError, quantize
from kernels_pallas.quantize_rows import split_rows
from kernels_pallas.quantized_matmul import digits_layout, quantized_matmul
from kernels_pallas.swiglu import swiglu_digits, swiglu_reference

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_quantized_decode_takes_digits_from_norms_and_swiglu[int8]',
    'test_add_rms_norm_writes_its_outputs_digits[1-640-128]',
    'test_add_rms_norm_writes_its_outputs_digits[2-300-0]',
}


EPS = 1.5625e-07


def normal(seed, shape, scale=1.0, dtype=jnp.bfloat16):
    return (scale * jax.random.normal(jax.random.key(seed), shape, jnp.float32)).astype(dtype)


def assert_digits_of(x, dg: ActDigits, interpret: bool):
    """dg holds exactly the digits the consumer's own prep computes from x, and they are not trivial."""
    if dg.group:
        planes, xg, step = digit_planes_pallas(x, dg.group, interpret=interpret)
        np.testing.assert_array_equal(np.asarray(dg.group_sums), np.asarray(xg))
    else:
        step, planes = split_rows(x, steps=SPLIT_STEPS, interpret=interpret)
        assert dg.group_sums is None
    np.testing.assert_array_equal(np.asarray(dg.digits), np.asarray(planes))
    np.testing.assert_array_equal(np.asarray(dg.step), np.asarray(step))
    d = np.asarray(dg.digits, np.int32)
    assert np.abs(d).max() == 127 and np.count_nonzero(d) > d.size // 2  # the absmax element's hi digit


class DigitCases:
    interpret = True

    @pytest.mark.parametrize("r,d,layout", [(1, 4096, 128), (1, 384, 64), (1, 640, 128), (3, 4096, 0), (2, 300, 0)])
    def test_add_rms_norm_writes_its_outputs_digits(self, r, d, layout):
        x, res = normal(r + d, (r, d), 2.0), normal(r * d, (r, d), 3.0)
        w = normal(7, (d,), 0.2, jnp.float32).astype(jnp.bfloat16) + 1
        y, s, dg = add_rms_norm(x, res, w, eps=EPS, digits=layout, interpret=self.interpret)
        ry, rs = add_rms_norm_reference(x, res, w, eps=EPS)
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(rs, np.float32))
        err = np.abs(np.asarray(y, np.float32) - np.asarray(ry, np.float32))
        assert np.all(err <= 2.0 ** -7 * np.abs(np.asarray(ry, np.float32)) + 1e-6), err.max()
        assert isinstance(dg, ActDigits) and dg.group == layout
        assert_digits_of(y, dg, self.interpret)

    @pytest.mark.parametrize("f,group,groups,warps", [(13696, 128, 4, 4), (640, 64, 8, 2), (384, 128, 1, 1)])
    def test_swiglu_writes_its_outputs_planes(self, f, group, groups, warps):
        gate_up = normal(f + group, (1, 2 * f), 3.0)
        h, dg = swiglu_digits(gate_up, group, groups=groups, num_warps=warps, interpret=self.interpret)
        ref = np.asarray(swiglu_reference(gate_up), np.float32)
        # exp on the GPU may differ from XLA's in the last float32 bit: within two bf16 roundings of the reference
        err = np.abs(np.asarray(h, np.float32) - ref)
        assert h.shape == (1, f) and np.all(err <= 2.0 ** -7 * np.abs(ref) + 1e-30), err.max()
        assert dg.group == group and dg.step.shape == (f // group,)
        assert_digits_of(h, dg, self.interpret)

    def test_quantized_matmul_with_digits_equals_its_own_prep(self):
        """Given the producer's digits, the int4 GEMV and the int8 xla_split path give what they give from x."""
        x = normal(3, (1, 640), 2.0)
        for w, layout in ((quantize(normal(4, (640, 384), 0.05, jnp.float32), "int4", k_major=True), 128),
                          (quantize(normal(5, (640, 384), 0.05, jnp.float32), "int8", k_major=True), 0)):
            impl = "xla_split" if layout == 0 else "auto"
            assert digits_layout(x, w, impl=impl, interpret=True) == layout
            planes = (digit_planes_pallas(x, 128, interpret=self.interpret) if layout else
                      split_rows(x, steps=SPLIT_STEPS, interpret=self.interpret)[::-1])
            dg = (ActDigits(step=planes[2], digits=planes[0], group_sums=planes[1], group=128) if layout else
                  ActDigits(step=planes[1], digits=planes[0], group_sums=None, group=0))
            kw = dict(impl=impl, interpret=self.interpret)
            want = quantized_matmul(x, w, **kw)
            got = quantized_matmul(x, w, x_digits=dg, **kw)
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
            # digits of another x are taken as given (the caller's contract): the output follows them
            other = quantized_matmul(2 * x, w, **kw)
            assert not np.array_equal(np.asarray(other), np.asarray(got))
            np.testing.assert_array_equal(np.asarray(quantized_matmul(2 * x, w, x_digits=dg, **kw)),
                                          np.asarray(got))


class TestDigitsInterpret(DigitCases):
    interpret = True


@pytest.mark.gpu
class TestDigitsGPU(DigitCases):
    interpret = False


def test_bad_digit_requests_are_named():
    x, w = normal(1, (2, 256)), normal(2, (256,)) + 1
    with pytest.raises(ValueError, match="one row for an int4 group"):
        add_rms_norm(x, x, w, eps=EPS, digits=128, interpret=True)
    with pytest.raises(ValueError, match="not split-K partial sums"):
        add_rms_norm(jnp.zeros((2, 2, 256), jnp.float32), x, w, eps=EPS, digits=0, interpret=True)
    with pytest.raises(ValueError, match="digits layout must be"):
        add_rms_norm(x, x, w, eps=EPS, digits=3, interpret=True)
    with pytest.raises(QuantFormatError, match="K a multiple of an even group"):
        add_rms_norm(x[:1, :200], x[:1, :200], w[:200], eps=EPS, digits=128, interpret=True)
    with pytest.raises(ValueError, match="one 16-bit float row"):
        swiglu_digits(x, 64, interpret=True)
    with pytest.raises(ValueError, match="groups must be a power of two"):
        swiglu_digits(x[:1], 64, groups=3, interpret=True)
    wq = quantize(normal(4, (256, 384), 0.05, jnp.float32), "int4", k_major=True)
    dg = ActDigits(step=jnp.ones((1,)), digits=jnp.zeros((4, 1, 64), jnp.int8), group_sums=jnp.zeros((1,)),
                    group=128)  # the planes of K = 128, not 256
    with pytest.raises(QuantFormatError, match="do not fit x"):
        quantized_matmul(x[:1], wq, interpret=True, x_digits=dg)
    rows = ActDigits(step=jnp.ones((1, 1)), digits=jnp.zeros((2, 256), jnp.int8), group_sums=None, group=0)
    # digits of another layout are not this path's: ignored (x's own prep serves)
    np.testing.assert_array_equal(np.asarray(quantized_matmul(x[:1], wq, interpret=True, x_digits=rows)),
                                  np.asarray(quantized_matmul(x[:1], wq, interpret=True)))
    w8 = quantize(normal(4, (256, 384), 0.05, jnp.float32), "int8")
    np.testing.assert_array_equal(np.asarray(quantized_matmul(x, w8, impl="xla_split", x_digits=dg)),
                                  np.asarray(quantized_matmul(x, w8, impl="xla_split")))
    with pytest.raises(QuantFormatError, match="do not fit x"):
        quantized_matmul(x, w8, impl="xla_split", x_digits=rows)  # the rows of one x row, not two
    with pytest.raises(QuantFormatError, match="x_digits must be"):
        quantized_matmul(x[:1], wq, interpret=True, x_digits=(1, 2))


def _spy(monkeypatch):
    from autoglm_jax.model import mlp as mlp_module
    from autoglm_jax.model import norm as norm_module
    calls = {"norm": 0, "swiglu": 0}

    def norm(*a, **kw):
        calls["norm"] += kw.get("digits") is not None
        return add_rms_norm(*a, **kw)

    def glu(*a, **kw):
        calls["swiglu"] += 1
        return swiglu_digits(*a, **kw)

    monkeypatch.setattr(norm_module, "add_rms_norm", norm)
    monkeypatch.setattr(mlp_module, "swiglu_digits", glu)
    return calls


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantized_decode_takes_digits_from_norms_and_swiglu(fmt, monkeypatch):
    """A bf16 tiny GLM quantized with k_major="auto" (interpret mode): cached batch-1 decode steps with the digits
    written by the norms and SwiGLU (take_digits="auto") give the logits of the same model whose projections compute
    them themselves ("off"), within bf16 rounding, and the same greedy tokens; in the traced one-row step the
    producers wrote digits wherever a projection takes them; "all" takes what "auto" does (``AUTO_DIGITS`` holds
    every layout)."""
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.loading import random_model
    from autoglm_jax.model import quantize_model
    from autoglm_jax.model.mlp import MLP
    from autoglm_jax.model.norm import RMSNorm
    from autoglm_jax.model.quantized_linear import QuantizedLinear

    cfg = GLMConfig.from_preset("tiny", num_layers=2, intermediate_size=768, vocab_size=512)
    model = random_model(cfg, dtype="bfloat16", seed=3)
    quantize_model(model, fmt, k_major="auto", interpret=True)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, RMSNorm):
            m.fused_kernel = "pallas"
        if isinstance(m, MLP):
            m.swiglu_kernel = "pallas"
    calls = _spy(monkeypatch)
    ids = jax.random.randint(jax.random.key(2), (1, 7), 1, cfg.vocab_size)
    out, counts = {}, {}
    prefill = jax.jit(lambda m, i, p, c: m(i, p, cache=c))  # one prefill for both decodes
    cache0 = DenseKVCache.create(cfg, 1, 32, jnp.bfloat16, decode_kernel="xla")
    _, cache0 = prefill(model, ids[:, :5], jnp.arange(5, dtype=jnp.int32)[None], cache0)
    for take in ("off", "auto"):
        for _, m in nnx.iter_modules(model):
            if isinstance(m, QuantizedLinear):
                m.take_digits = take
        step, cache = jax.jit(lambda m, i, p, c: m(i, p, cache=c)), cache0
        calls.update(norm=0, swiglu=0)  # count the one-row decode step's trace only
        steps = []
        for t in range(5, 7):
            logits, cache = step(model, ids[:, t:t + 1], jnp.full((1, 1), t, jnp.int32), cache)
            steps.append(np.asarray(logits[:, 0], np.float32))
        out[take], counts[take] = np.stack(steps), dict(calls)
    # every norm after layer 0's input norm (no residual there) writes its consumer's digits (int8 rows, int4 planes)
    # and SwiGLU down_proj's int4 planes (int8's down_proj on the CPU table takes the Pallas dot: no digits)
    norms, layers = 2 * cfg.num_layers - 1, cfg.num_layers
    assert counts == {"off": {"norm": 0, "swiglu": 0},
                      "auto": {"norm": norms, "swiglu": layers * (fmt == "int4")}}, counts
    scale = np.abs(out["off"]).max()
    assert np.abs(out["auto"] - out["off"]).max() <= 0.02 * scale
    np.testing.assert_array_equal(out["auto"].argmax(-1), out["off"].argmax(-1))
    x = jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), jnp.bfloat16)
    for lin in (model.layers[1].attn.qkv_proj, model.layers[1].mlp.gate_up_proj):
        layouts = []
        for take in ("auto", "all"):
            lin.take_digits = take
            layouts.append(lin.digits_layout(x))
        assert layouts[0] == layouts[1] == (128 if fmt == "int4" else 0), layouts
    lin = model.layers[1].mlp.gate_up_proj
    lin.take_digits = "sometimes"
    with pytest.raises(ValueError, match="take_digits="):
        lin.digits_layout(jax.ShapeDtypeStruct((1, 1, cfg.hidden_size), jnp.bfloat16))


def test_o_proj_takes_digits_from_the_attention_kernel(monkeypatch):
    """A bf16 GLM with 16 query heads a KV head quantized int4 with the group = head_dim (interpret mode): with
    o_proj's ``take_digits="all"`` the dense decode kernel's combine writes o_proj's digit planes
    (``decode_combine.combine_planes``, in the traced one-row step) and the decode gives the logits
    and greedy tokens of "off"; "auto" does not ask for them (``AUTO_DIGITS`` has no "attention")."""
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.loading import random_model
    from autoglm_jax.model import quantize_model
    from kernels_pallas import dense_decode_attention as dda

    calls = {"combine": 0}
    real = dda.combine_planes

    def combine(*a, **kw):
        calls["combine"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(dda, "combine_planes", combine)
    cfg = GLMConfig.from_preset("tiny", num_layers=1, num_heads=32, num_kv_heads=2, head_dim=64, vocab_size=512,
                                intermediate_size=768)
    model = random_model(cfg, dtype="bfloat16", seed=4)
    quantize_model(model, "int4", group=64, k_major="auto", interpret=True,  # o_proj only: a lighter trace
                   keep_float=("lm_head", "*qkv_proj", "*gate_up_proj", "*down_proj"))
    ids = jax.random.randint(jax.random.key(5), (1, 6), 1, cfg.vocab_size)
    out, counts = {}, {}
    for take in ("off", "all"):
        for layer in model.layers:
            layer.attn.o_proj.take_digits = take
        cache = DenseKVCache.create(cfg, 1, 32, jnp.bfloat16, decode_kernel="pallas")
        step = jax.jit(lambda m, i, p, c: m(i, p, cache=c))
        logits, cache = step(model, ids[:, :5], jnp.arange(5, dtype=jnp.int32)[None], cache)
        calls["combine"] = 0  # the one-row decode step's trace only
        logits, cache = step(model, ids[:, 5:], jnp.full((1, 1), 5, jnp.int32), cache)
        out[take], counts[take] = np.asarray(logits[:, 0], np.float32), calls["combine"]
    assert counts["off"] == 0 < counts["all"], counts  # (the layers share one trace of the kernel)
    scale = np.abs(out["off"]).max()
    assert np.abs(out["all"] - out["off"]).max() <= 0.02 * scale
    np.testing.assert_array_equal(out["all"].argmax(-1), out["off"].argmax(-1))
    o_proj, x = model.layers[0].attn.o_proj, jax.ShapeDtypeStruct((1, 1, cfg.num_heads * cfg.head_dim), jnp.bfloat16)
    layouts = []
    for take in ("auto", "all"):
        o_proj.take_digits = take
        layouts.append(o_proj.digits_layout(x, "attention"))
    assert layouts == [None, cfg.head_dim], layouts
