"""quantized_matmul: every kernel path vs the reference, the reference vs float64 numpy, QuantizedLinear, model swap
(the XLA int8 paths, ``xla_split`` and K-major int8: ``test_quantized_matmul_xla.py``).

Kernel cases run with a NaN-poisoned output buffer (``_poison=True``; with split-K the partial-sum buffer is
poisoned), fresh random non-zero inputs, ragged M (padding) and N not a multiple of the block (masking).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.qmatmul_tiles import TileConfig, default_config, lookup
from kernels_pallas.quant_formats import QuantFormatError, quantize_int4, quantize_int8
from kernels_pallas.quantized_matmul import fit_config, fit_tpu_config, quantized_matmul, quantized_matmul_reference

from .qmatmul_fixtures import problem, rel_err

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_matches_reference[int4_g64_sym-asm4]',
    'test_matches_reference[int4_g64_sym-asm6]',
    'test_matches_reference[int4_g128_asym-asm3]',
    'test_matches_reference[int4_g128_asym-asm5]',
    'test_matches_reference[int4_g128_asym-asm7]',
    'test_matches_reference[int4_g64_sym-part8]',
    'test_matches_reference[int4_g128_asym-part9]',
    'test_matches_reference[int4_g64_sym-part10]',
    'test_matches_reference[int4_g64_sym-unroll11]',
    'test_matches_reference[int8-unroll12]',
    'test_matches_reference[int8_kmajor-case12]',
    'test_matches_reference[int8_kmajor-case13]',
}


FORMATS = [("int8", {}), ("int4", dict(group=64, symmetric=True)), ("int4", dict(group=128, symmetric=False)),
           ("w8a8", {})]
FMT_IDS = ["int8", "int4_g64_sym", "int4_g128_asym", "w8a8"]


def check_kernel(x, q, cfg, *, impl, interpret, tol=1e-4):
    out = jax.jit(lambda x, q: quantized_matmul(x, q, out_dtype=jnp.float32, impl=impl, interpret=interpret,
                                                config=cfg, _poison=True))(x, q)
    ref = jax.jit(lambda x, q: quantized_matmul_reference(x, q, out_dtype=jnp.float32))(x, q)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert bool(jnp.isfinite(out).all()), "unwritten (NaN-poisoned) outputs"
    assert rel_err(out, ref) < tol


# (M, K, N, config); more configs and GLM shapes run on the GPU (TestGpuKernelGPU).
GPU_CASES = [
    (1, 256, 200, TileConfig(kernel="gemv", block_m=1, block_n=64, block_k=64, split_k=3, prefetch=True)),
    (5, 256, 130, TileConfig(kernel="dot", block_m=16, block_n=128, block_k=128, split_k=2, fast_dequant=False)),
    (33, 256, 72, TileConfig(kernel="dot", block_m=32, block_n=64, block_k=128, split_k=1)),
    # int4 nibbles -> bf16 pairs in PTX (interpret mode: the same values in jnp)
    (1, 256, 200, TileConfig(kernel="gemv", block_m=1, block_n=64, block_k=128, split_k=2, asm_dequant=True)),
    (1, 512, 136, TileConfig(kernel="dot", block_m=16, block_n=64, block_k=256, split_k=3, asm_dequant=True)),
    (70, 256, 130, TileConfig(kernel="dot", block_m=64, block_n=128, block_k=128, split_k=1, asm_dequant=True)),
    # + the weights scaled to bf16 in PTX (one rounding per weight: checked at 5e-3, as XLA's bf16 dequantization)
    (1, 512, 136, TileConfig(kernel="dot", block_m=16, block_n=64, block_k=256, split_k=3, asm_dequant=True,
                             scale_in_bf16=True)),
    (70, 256, 130, TileConfig(kernel="dot", block_m=64, block_n=128, block_k=128, split_k=1, asm_dequant=True,
                              scale_in_bf16=True)),
    # int4 steps of part of a group (block_k < group: 2 or 4 steps a group), asm and not, dot and gemv
    (1, 512, 136, TileConfig(kernel="dot", block_m=16, block_n=64, block_k=64, split_k=3, asm_dequant=True)),
    (3, 256, 200, TileConfig(kernel="dot", block_m=16, block_n=128, block_k=32, split_k=2)),
    (1, 256, 200, TileConfig(kernel="gemv", block_m=1, block_n=64, block_k=32, split_k=2, asm_dequant=True)),
    # the K loop written out (unroll: u tiles loaded ahead), gemv and dot, int8 in both layouts and int4
    (1, 512, 200, TileConfig(kernel="gemv", block_m=1, block_n=16, block_k=128, split_k=1, unroll=2)),
    (1, 768, 136, TileConfig(kernel="gemv", block_m=1, block_n=8, block_k=128, split_k=2, unroll=5)),
    (5, 256, 130, TileConfig(kernel="dot", block_m=16, block_n=64, block_k=64, split_k=2, unroll=1)),
    (1, 768, 136, TileConfig(kernel="gemv", block_m=1, block_n=32, block_k=128, split_k=2, prefetch=True)),
]
INT8_KMAJOR = ("int8", dict(k_major=True))
KERNEL_CASES = ([(fmt, kw, 0) for fmt, kw in FORMATS] + [(*FORMATS[1], 1), (*FORMATS[3], 1), (*FORMATS[0], 2)]
                + [(*FORMATS[i], c) for c in (3, 4, 5, 6, 7, 8, 9, 10) for i in (1, 2)]
                + [(*INT8_KMAJOR, c) for c in (1, 2, 11, 12, 13, 14)] + [(*FORMATS[i], c) for c in (11, 12) for i in (0, 1)])
KERNEL_IDS = ([f"{name}-case0" for name in FMT_IDS] + ["int4_g64_sym-case1", "w8a8-case1", "int8-case2"]
              + [f"{FMT_IDS[i]}-asm{c}" for c in (3, 4, 5, 6, 7) for i in (1, 2)]
              + [f"{FMT_IDS[i]}-part{c}" for c in (8, 9, 10) for i in (1, 2)]
              + [f"int8_kmajor-case{c}" for c in (1, 2, 11, 12, 13, 14)]
              + [f"{FMT_IDS[i]}-unroll{c}" for c in (11, 12) for i in (0, 1)])


class GpuKernelCases:
    """The GPU (Triton-lowered) Pallas kernels. Case 0: gemv with prefetch, ragged N, and split-K where the
    last split gets no K steps; case 1: dot with ragged M and N, split-K, exact converts; case 2: 2 M blocks;
    cases 11-13: the K loop unrolled; int8_kmajor: the K-major [N, K] int8 weight's [block_n, block_k] tiles."""
    interpret = False

    @pytest.mark.parametrize("fmt,kw,case", KERNEL_CASES, ids=KERNEL_IDS)
    def test_matches_reference(self, fmt, kw, case):
        m, k, n, cfg = GPU_CASES[case]
        x, q, _ = problem(100 + case, m, k, n, fmt, kw)
        check_kernel(x, q, cfg, impl="pallas_gpu", interpret=self.interpret, tol=5e-3 if cfg.scale_in_bf16 else 1e-4)
        if cfg.scale_in_bf16:  # the one bf16 rounding per weight, exactly: against a dot of the bf16-rounded weight
            w = q.dequantize(jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)
            want = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
            got = quantized_matmul(x, q, out_dtype=jnp.float32, impl="pallas_gpu", interpret=self.interpret, config=cfg)
            assert rel_err(got, want) < 1e-5


@pytest.mark.gpu
class TestGpuKernelGPU(GpuKernelCases):
    interpret = False

    @pytest.mark.parametrize("fmt,kw", [FORMATS[0], ("int4", dict(group=128, symmetric=True)), FORMATS[3]],
                             ids=["int8", "int4_g128_sym", "w8a8"])
    @pytest.mark.parametrize("m", [1, 40])
    def test_dispatch_glm_shapes(self, fmt, kw, m):
        """The tuned (or default) config at a GLM-4 shape with ragged M, through the public entry point."""
        x, q, _ = problem(m, m, 4096, 4608, fmt, kw)
        out = quantized_matmul(x, q, out_dtype=jnp.float32)
        # the table may pick XLA's path, which rounds a dequantized int4 weight to bf16 (~1e-3)
        assert rel_err(out, quantized_matmul_reference(x, q, out_dtype=jnp.float32)) < (5e-3 if fmt == "int4" else 1e-3)

    @pytest.mark.parametrize("fmt,kw", FORMATS, ids=FMT_IDS)
    def test_long_k_split(self, fmt, kw):
        x, q, _ = problem(5, 1, 13696, 4096 + 64, fmt, kw)
        cfg = TileConfig(kernel="gemv", block_m=1, block_n=256, block_k=128, split_k=8, prefetch=True)
        check_kernel(x, q, cfg, impl="pallas_gpu", interpret=False)


    @pytest.mark.parametrize("offset", [8, 0])
    def test_int4_asm_planes_every_byte(self, offset):
        """The PTX nibble unpacking against jnp on all 256 byte values, at every position of a packed group."""
        from jax.experimental import pallas as pl
        from kernels_pallas.qmatmul_gpu import _int4_planes
        p = jnp.asarray(np.random.default_rng(offset).permutation(np.arange(512) % 256).reshape(16, 32), jnp.uint8)

        def kernel(p_ref, lo_ref, hi_ref):
            lo_ref[...], hi_ref[...] = _int4_planes(p_ref[...], offset, False)
        out = jax.ShapeDtypeStruct(p.shape, jnp.bfloat16)
        lo, hi = pl.pallas_call(kernel, out_shape=(out, out))(p)
        want_lo, want_hi = _int4_planes(p, offset, True)
        np.testing.assert_array_equal(np.asarray(lo, np.float32), np.asarray(want_lo, np.float32))
        np.testing.assert_array_equal(np.asarray(hi, np.float32), np.asarray(want_hi, np.float32))
        np.testing.assert_array_equal(np.asarray(want_hi, np.float32), np.asarray(p >> 4, np.float32) - offset)


class TestGpuKernelInterpret(GpuKernelCases):
    interpret = True


class TestTpuKernelInterpret:
    """The Mosaic TPU kernel body, in interpret mode (no TPU here)."""

    @pytest.mark.parametrize("fmt,kw", FORMATS[:1] + FORMATS[2:], ids=FMT_IDS[:1] + FMT_IDS[2:])
    @pytest.mark.parametrize("m,k,n", [(20, 256, 200)])
    def test_matches_reference(self, fmt, kw, m, k, n):
        x, q, _ = problem(7 + m, m, k, n, fmt, kw)
        cfg = TileConfig(kernel="dot", block_m=16, block_n=128, block_k=128)
        check_kernel(x, q, cfg, impl="pallas_tpu", interpret=True)


@pytest.mark.parametrize("fmt,kw", FORMATS, ids=FMT_IDS)
def test_xla_path_matches_reference(fmt, kw):
    x, q, _ = problem(3, 6, 256, 136, fmt, kw)
    out = quantized_matmul(x, q, out_dtype=jnp.float32, impl="xla")
    # int4 on the XLA path dequantizes to bf16 first (w = (u - z) * s rounded); int8 stays exact.
    assert rel_err(out, quantized_matmul_reference(x, q, out_dtype=jnp.float32)) < (1e-2 if fmt == "int4" else 1e-4)


# ------------------------------------------------------------------------- reference vs float64 numpy
@pytest.mark.parametrize("fmt,kw", FORMATS, ids=FMT_IDS)
def test_reference_matches_float64_dot_of_dequantized_weight(fmt, kw):
    x, q, w = problem(11, 4, 256, 96, fmt, kw, x_dtype=jnp.float32)
    bias = jax.random.normal(jax.random.key(5), (96,), jnp.float32)
    out = quantized_matmul_reference(x[None], q, bias=bias)  # leading dims are kept
    xn = np.asarray(x, np.float64)
    if fmt == "w8a8":  # independent per-token quantization in numpy
        sx = np.abs(xn).max(axis=1, keepdims=True) / 127.0
        xn = np.clip(np.round(xn / sx), -127, 127) * sx
    expect = xn @ np.asarray(q.dequantize(jnp.float32), np.float64) + np.asarray(bias, np.float64)
    assert out.shape == (1, 4, 96)
    assert rel_err(out[0], expect) < 1e-5
    # and quantization error itself is small against the float weight
    assert rel_err(q.dequantize(), w) < (0.02 if fmt in ("int8", "w8a8") else 0.2)


def test_bias_leading_dims_and_out_dtype_through_kernel():
    x, q, _ = problem(2, 6, 256, 130, "int8", {})
    x = x.reshape(2, 3, 256)
    bias = jax.random.normal(jax.random.key(9), (130,), jnp.float32)
    cfg = TileConfig(kernel="dot", block_m=16, block_n=64, block_k=64, split_k=2)
    out = quantized_matmul(x, q, bias=bias, impl="pallas_gpu", interpret=True, config=cfg)
    ref = quantized_matmul_reference(x, q, bias=bias)
    assert out.shape == (2, 3, 130) and out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref.astype(jnp.float32)) < 1e-2


# ------------------------------------------------------------------------------ validation, tuning table
def test_bad_inputs_raise_before_launch():
    w = 0.05 * jax.random.normal(jax.random.key(0), (256, 64))
    q = quantize_int8(w)
    x = jnp.ones((2, 256), jnp.bfloat16)
    with pytest.raises(QuantFormatError, match="float32, bfloat16 or float16"):
        quantized_matmul(x.astype(jnp.int32), q, impl="pallas_gpu")
    with pytest.raises(QuantFormatError, match="I = 256"):
        quantized_matmul(jnp.ones((2, 128), jnp.bfloat16), q, impl="pallas_gpu")
    with pytest.raises(QuantFormatError, match="bias"):
        quantized_matmul(x, q, bias=jnp.ones((65,)), impl="pallas_gpu")
    with pytest.raises(QuantFormatError, match="scale"):
        quantized_matmul(x, type(q)(qweight=q.qweight, scale=q.scale[:10]), impl="pallas_gpu")
    with pytest.raises(QuantFormatError, match="int8"):
        quantized_matmul(x, type(q)(qweight=q.qweight.astype(jnp.int32), scale=q.scale), impl="pallas_gpu")
    q4 = quantize_int4(w, group=64)
    with pytest.raises(QuantFormatError, match="multiple of group"):
        quantized_matmul(jnp.ones((2, 224), jnp.bfloat16), type(q4)(packed=q4.packed[:112], scale=q4.scale[:3],
                                                                    zero=None, group=64), impl="pallas_gpu")
    with pytest.raises(ValueError, match="scale_in_bf16 needs asm_dequant"):
        TileConfig(kernel="dot", scale_in_bf16=True)
    with pytest.raises(ValueError, match="asm_dequant is for Int4Weight only"):
        quantized_matmul(x, q, impl="pallas_gpu", interpret=True, config=TileConfig(asm_dequant=True))
    with pytest.raises(QuantFormatError, match="impl"):
        quantized_matmul(x, q, impl="cuda")
    with pytest.raises(QuantFormatError, match="qweight must be one of"):
        quantized_matmul(x, w)


def test_table_lookup_and_default():
    table = ({"device": "h100", "format": "int8", "m": 1, "k": 4096, "n": 27392,
              "config": TileConfig(kernel="gemv", block_m=1, block_n=512, block_k=16, split_k=8).to_json()},
             {"device": "h100", "format": "int8", "m": 32, "k": 4096, "n": 27392,
              "config": TileConfig(kernel="xla").to_json()})
    assert lookup("h100", "int8", 1, 4096, 27392, table=table).block_n == 512
    assert lookup("h100", "int8", 20, 4096, 27392, table=table).kernel == "xla"  # next tuned M up
    assert lookup("h100", "int8", 1, 13696, 4096, table=table).block_n == 512  # nearest shape
    assert lookup("a100", "int8", 1, 4096, 27392, table=table) == default_config("int8", 1)  # no rows of its own
    assert lookup("h200", "int8", 1, 4096, 27392, table=table).block_n == 512  # the H100's (the same chip)
    h200 = ({**table[0], "device": "h200", "config": {**table[0]["config"], "block_n": 256}},)
    assert lookup("h200", "int8", 1, 4096, 27392, table=table + h200).block_n == 256  # its own rows win
    assert lookup("h200", "int8", 32, 4096, 27392, table=table + h200).kernel == "xla"  # per M: the H100's M=32
    down = ({**h200[0], "k": 13696, "n": 4096, "config": {**h200[0]["config"], "block_n": 128}},)
    assert lookup("h200", "int8", 1, 4096, 27392, table=table + down).block_n == 512  # per shape: the H100's gate_up
    assert lookup("h200", "int8", 1, 13696, 4096, table=table + down).block_n == 128  # and its own down
    other = ({**table[0], "format": "int8_kmajor"},)
    assert lookup("h200", "int8_kmajor", 1, 4096, 27392, table=table + h200 + other).block_n == 512  # per format
    int4 = ({**table[0], "format": "int4_g128_sym", "config": {**table[0]["config"], "block_k": 128}},)
    assert lookup("h100", "int4_g64_asym", 1, 4096, 27392, table=int4).block_n == 512  # borrowed from int4
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_n=100)
    with pytest.raises(ValueError, match="unroll"):
        TileConfig(unroll=-1)
    # unroll is kept only where every split gets the same static number of K steps
    q8 = quantize_int8(jnp.ones((768, 64)))  # K=768: 6 steps of 128
    assert fit_config(TileConfig(kernel="gemv", block_m=1, block_k=128, split_k=2, unroll=3), q8, 1).unroll == 3
    assert fit_config(TileConfig(kernel="gemv", block_m=1, block_k=128, split_k=4, unroll=3), q8, 1).unroll == 0
    # Mosaic TPU tiles: (16, 128)-aligned blocks and a block_k dividing K, else XLA (None)
    q = quantize_int8(jnp.ones((384, 256)))
    tpu = fit_tpu_config(TileConfig(kernel="gemv", block_m=1, block_n=64, block_k=512), q)
    assert (tpu.kernel, tpu.block_m, tpu.block_n, tpu.block_k) == ("dot", 16, 128, 128)
    assert fit_tpu_config(TileConfig(), quantize_int8(jnp.ones((400, 256)))) is None


# ----------------------------------------------------------------------------- layer and model swap
def test_quantized_linear_matches_linear_and_keeps_axes():
    from autoglm_jax.model import Linear
    from autoglm_jax.model.quantized_linear import QuantizedLinear
    lin = Linear(256, 192, axes=("embed", "mlp"), use_bias=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lin.bias[...] = jax.random.normal(jax.random.key(3), (192,))
    x = jax.random.normal(jax.random.key(4), (2, 3, 256), jnp.float32)
    for fmt, kw in [("int8", {}), ("int4", dict(group=64, symmetric=False)), ("w8a8", {})]:
        ql = QuantizedLinear.from_linear(lin, fmt, **kw)
        graphdef, state = nnx.split(ql)
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
        assert out.shape == (2, 3, 192) and out.dtype == jnp.bfloat16
        assert rel_err(out.astype(jnp.float32), lin(x).astype(jnp.float32)) < (0.03 if fmt != "int4" else 0.15)
        assert ql.qweight.get_metadata()["logical_axes"] == (("mlp", "embed") if fmt == "w8a8" else ("embed", "mlp"))
        assert ql.bias.get_metadata()["logical_axes"] == ("mlp",)
        assert ql.scale.get_metadata()["logical_axes"][-1] == "mlp"


def test_quantize_model_runs_end_to_end():
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.model import GLMForCausalLM, Linear
    from autoglm_jax.model.quantized_linear import QuantizedLinear, quantize_model
    cfg = GLMConfig.from_preset("tiny", num_layers=2, vocab_size=512)
    model = GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(1), (2, 5), 0, cfg.vocab_size)
    run = lambda gd, st, i: jax.jit(lambda s, i: nnx.merge(gd, s)(i))(st, i)
    ref = run(*nnx.split(model), ids)
    swapped = quantize_model(model, "int8", keep_float=("lm_head", "layers.1.mlp.*"))
    assert "layers.0.mlp.down_proj" in swapped and "layers.1.mlp.down_proj" not in swapped
    assert isinstance(model.lm_head, Linear) and isinstance(model.layers[1].mlp.down_proj, Linear)
    assert isinstance(model.layers[0].attn.qkv_proj, QuantizedLinear)
    out = run(*nnx.split(model), ids)
    assert out.shape == ref.shape and bool(jnp.isfinite(out).all())
    assert 0 < rel_err(out, ref) < 0.05


def test_every_committed_table_entry_is_a_valid_config():
    """Each entry of kernels_pallas/tuned/quantized_matmul.json builds a TileConfig (a hand edit that switched an
    entry to XLA but kept a kernel-only flag, e.g. weight_regs, once made int4 prefill raise at lookup)."""
    from kernels_pallas.qmatmul_tiles import load_table
    table = load_table()
    assert table, "the committed tuned table is missing or empty"
    for e in table:
        assert lookup(e["device"], e["format"], e["m"], e["k"], e["n"], table=table) == TileConfig(**e["config"])
