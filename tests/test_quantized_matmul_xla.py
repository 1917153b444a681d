"""quantized_matmul's XLA int8 paths: ``xla_split`` (XLA's int8 x int8 dot of two-int8-digit activations) within
its error bound, and K-major int8 weights (``qweight [N, K]``) through the XLA paths, the layer and the model."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.qmatmul_tiles import TileConfig, default_config, lookup
from kernels_pallas.quant_formats import Int8Weight, QuantFormatError, quantize
from kernels_pallas.quantized_matmul import SPLIT_MAX_K, quantized_matmul, quantized_matmul_reference

from .qmatmul_fixtures import problem, rel_err

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_k_major_paths_match_kn[3-1024-130-bf16]',
    'test_k_major_paths_match_kn[3-1024-130-f32]',
    'test_k_major_paths_match_kn[8-512-72-bf16]',
    'test_k_major_paths_match_kn[8-512-72-f32]',
    'test_xla_split_within_its_bound[3-1024-130-normal-bf16]',
    'test_xla_split_within_its_bound[3-1024-130-normal-f32]',
    'test_xla_split_within_its_bound[3-1024-130-outlier-bf16]',
    'test_xla_split_within_its_bound[3-1024-130-outlier-f32]',
    'test_xla_split_within_its_bound[8-512-72-normal-bf16]',
    'test_xla_split_within_its_bound[8-512-72-normal-f32]',
    'test_xla_split_within_its_bound[8-512-72-outlier-bf16]',
    'test_xla_split_within_its_bound[8-512-72-outlier-f32]',
}


# ------------------------------------------- xla_split: XLA's int8 x int8 dot of two-int8-digit activations
SPLIT_SHAPES = [(1, 256, 200), (3, 1024, 130), (8, 512, 72), (33, 4096, 96)]  # ragged M, N not x128


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("outliers", [False, True], ids=["normal", "outlier"])
@pytest.mark.parametrize("m,k,n", SPLIT_SHAPES)
def test_xla_split_within_its_bound(m, k, n, outliers, x_dtype):
    x, q, _ = problem(40 + m, m, k, n, "int8", {}, x_dtype=x_dtype)
    if outliers:  # one element per row 100x the others, at a random column: the row's step grows 100x
        cols = jax.random.randint(jax.random.key(m), (m,), 0, k)
        x = x.at[jnp.arange(m), cols].multiply(100)
    out = jax.jit(lambda x, q: quantized_matmul(x, q, out_dtype=jnp.float32, impl="xla_split"))(x, q)
    ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
    assert out.shape == (m, n) and bool(jnp.isfinite(out).all())
    # int8_split_matmul's bound: every activation is carried within step / 2 (step = row absmax / 16256; the
    # 2**-8 slack covers the float32 rounding of x / step), so |out - x @ W| <= step / 2 * sum_k |W[k, n]|;
    # plus float32 rounding of the reference's dot (at most K ulps of |x| @ |W|) and of the recombination.
    xf, wa = np.asarray(x, np.float64), np.abs(np.asarray(q.dequantize(), np.float64))
    step = np.abs(xf).max(axis=1, keepdims=True) / (127 * 128)
    bound = 0.5 * step * wa.sum(axis=0) * (1 + 2.0**-8) + k * 2.0**-24 * (np.abs(xf) @ wa)
    err = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    assert (err <= bound).all(), f"worst err / bound = {(err / bound).max():.3f}"
    # in norm (random rounding errors add like sqrt(K), the bound above like K): below 2**-9, under the worst
    # relative rounding of a bf16 output (2**-9 to 2**-8); for float32 x, closer than rounding x to bf16 gets
    assert rel_err(out, ref) < 2.0**-9
    if x_dtype == jnp.float32:
        ref_bf16 = quantized_matmul_reference(x.astype(jnp.bfloat16).astype(jnp.float32), q, out_dtype=jnp.float32)
        assert rel_err(out, ref) < rel_err(ref_bf16, ref)


@pytest.mark.parametrize("k_major", [False, True], ids=["kn", "nk"])
@pytest.mark.parametrize("k_blocks", [2, 4])
def test_xla_split_k_blocks_within_the_per_block_bound(k_blocks, k_major):
    """k_blocks > 1 (set on row-parallel layers under tensor parallelism): each K block of each row gets its own
    step, so the bound is the per-block one; one outlier block must not coarsen the others."""
    m, k, n = 5, 1024, 136
    x, q, _ = problem(60 + k_blocks, m, k, n, "int8", {}, x_dtype=jnp.float32)
    x = x.at[:, : k // k_blocks].multiply(100)  # block 0 of every row 100x the rest
    if k_major:
        q = q.with_layout(k_major=True)
    out = jax.jit(lambda x, q: quantized_matmul(x, q, out_dtype=jnp.float32, impl="xla_split",
                                                k_blocks=k_blocks))(x, q)
    ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
    xf = np.asarray(x, np.float64).reshape(m, k_blocks, k // k_blocks)
    wa = np.abs(np.asarray(q.dequantize(), np.float64)).reshape(k_blocks, k // k_blocks, n)
    step = np.abs(xf).max(axis=2) / (127 * 128)  # [M, b]
    bound = (0.5 * np.einsum("mb,bn->mn", step, wa.sum(axis=1)) * (1 + 2.0**-8)
             + k * 2.0**-24 * np.einsum("mbk,bkn->mn", np.abs(xf), wa))
    err = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    assert (err <= bound).all(), f"worst err / bound = {(err / bound).max():.3f}"
    # the blocks other than the outlier one are carried 100x finer than one step per row would carry them
    one_step = quantized_matmul(x, q, out_dtype=jnp.float32, impl="xla_split")
    assert rel_err(out, ref) < rel_err(one_step, ref)
    with pytest.raises(QuantFormatError, match="k_blocks=3 must be a positive int dividing K=1024"):
        quantized_matmul(x, q, impl="xla_split", k_blocks=3)


def test_xla_split_exact_at_the_k_bound():
    """K = SPLIT_MAX_K with the largest digits (hi = 127, lo = 0) against q = -128: the int32 sums reach
    -16256 * K >= -2**31 without overflow, so the product is exact up to float32 rounding."""
    k = SPLIT_MAX_K
    q = Int8Weight(qweight=jnp.full((k, 2), -128, jnp.int8), scale=jnp.array([1.0, 0.5], jnp.float32))
    out = quantized_matmul(jnp.full((1, k), 0.75, jnp.float32), q, impl="xla_split")
    np.testing.assert_allclose(np.asarray(out[0]), [-96.0 * k, -48.0 * k], rtol=1e-6)


def test_xla_split_dispatch_and_errors():
    x, q, _ = problem(21, 5, 256, 136, "int8", {})
    split = quantized_matmul(x, q, out_dtype=jnp.float32, impl="xla_split")
    cfg = TileConfig(kernel="xla_split")  # what lookup returns where the tuned table chose it
    table = ({"device": "h100", "format": "int8", "m": 8, "k": 256, "n": 136, "config": cfg.to_json()},)
    assert lookup("h100", "int8", 5, 256, 136, table=table) == cfg
    np.testing.assert_array_equal(quantized_matmul(x, q, out_dtype=jnp.float32, impl="pallas_gpu", config=cfg),
                                  split)
    # bias and leading dims go through it as through the other paths
    bias = jax.random.normal(jax.random.key(2), (136,), jnp.float32)
    out = quantized_matmul(x.reshape(1, 5, 256), q, bias=bias, out_dtype=jnp.float32, impl="xla_split")
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(split + bias), rtol=1e-6, atol=1e-6)
    # the table's choice falls back to XLA's dequantize-then-dot for float32 x, other formats, K over the bound
    xla = lambda x, q: quantized_matmul(x, q, impl="xla")
    routed = lambda x, q: quantized_matmul(x, q, impl="pallas_gpu", config=cfg)
    xf = x.astype(jnp.float32)
    np.testing.assert_array_equal(routed(xf, q), xla(xf, q))
    xw, qw, _ = problem(22, 5, 256, 136, "w8a8", {})
    np.testing.assert_array_equal(routed(xw, qw), xla(xw, qw))
    big = Int8Weight(qweight=jnp.ones((SPLIT_MAX_K + 16, 2), jnp.int8), scale=jnp.ones((2,), jnp.float32))
    xb = jnp.ones((1, SPLIT_MAX_K + 16), jnp.bfloat16)
    np.testing.assert_array_equal(routed(xb, big), xla(xb, big))
    # forced: Int8Weight only, K within the bound
    with pytest.raises(QuantFormatError, match="xla_split.*Int8Weight.*W8A8Weight"):
        quantized_matmul(xw, qw, impl="xla_split")
    with pytest.raises(QuantFormatError, match=f"K <= {SPLIT_MAX_K}.*K={SPLIT_MAX_K + 16}"):
        quantized_matmul(xb, big, impl="xla_split")


# --------------------------------------------------- K-major int8 (qweight [N, K]): the XLA paths only
KMAJOR_SHAPES = [(1, 256, 200), (3, 1024, 130), (8, 512, 72), (33, 256, 96)]  # ragged M, N not x128


@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("m,k,n", KMAJOR_SHAPES)
def test_k_major_paths_match_kn(m, k, n, x_dtype):
    x, kn, w = problem(60 + m, m, k, n, "int8", {}, x_dtype=x_dtype)
    nk = quantize(w, "int8", k_major=True)
    assert nk.qweight.shape == (n, k) and bool((nk.qweight.T == kn.qweight).all())
    assert bool((x != 0).all()) and bool((kn.qweight != 0).any())
    for impl in ("reference", "xla", "xla_split"):
        f = jax.jit(lambda x, q, impl=impl: quantized_matmul(x, q, out_dtype=jnp.float32, impl=impl))
        a, b = f(x, kn), f(x, nk)
        assert b.shape == (m, n) and bool(jnp.isfinite(b).all())
        if impl == "xla_split":  # exact int32 sums, the same float32 recombination: identical
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        else:  # the same float products; under jit XLA fuses the transpose and may sum in another order
            assert rel_err(b, a) < 1e-6, impl
    # auto: the table/config routing serves it with xla_split (bf16/f16 x) or xla (float32 x), never Pallas
    routed = quantized_matmul(x, nk, out_dtype=jnp.float32, interpret=True)
    want = "xla" if x_dtype == jnp.float32 else "xla_split"
    np.testing.assert_array_equal(np.asarray(routed),
                                  np.asarray(quantized_matmul(x, nk, out_dtype=jnp.float32, impl=want)))


def test_k_major_dispatch_table_and_errors():
    x, kn, w = problem(70, 5, 256, 136, "int8", {})
    nk = quantize(w, "int8", k_major=True)
    split = quantized_matmul(x, nk, out_dtype=jnp.float32, impl="xla_split")
    xla = quantized_matmul(x, nk, out_dtype=jnp.float32, impl="xla")
    # the table keys the layout apart: an int8 entry does not serve int8_kmajor, whose default is xla_split
    entry = {"device": "h100", "m": 8, "k": 256, "n": 136, "config": TileConfig(kernel="xla").to_json()}
    assert lookup("h100", "int8_kmajor", 5, 256, 136, table=({**entry, "format": "int8"},)) == \
        TileConfig(kernel="xla_split") == default_config("int8_kmajor", 1)
    assert lookup("h100", "int8_kmajor", 5, 256, 136, table=({**entry, "format": "int8_kmajor"},)).kernel == "xla"
    run = lambda x, cfg: quantized_matmul(x, nk, out_dtype=jnp.float32, interpret=True, config=cfg)
    np.testing.assert_array_equal(run(x, TileConfig(kernel="xla")), xla)  # an XLA entry is taken as it is
    np.testing.assert_array_equal(run(x, TileConfig(kernel="xla_split")), split)
    np.testing.assert_array_equal(run(x.astype(jnp.float32), TileConfig(kernel="xla_split")),
                                  quantized_matmul(x.astype(jnp.float32), nk, out_dtype=jnp.float32, impl="xla"))
    # a Pallas entry runs the GPU kernel on the [N, K] tiles: the kn kernel's sums, in another order
    dot = TileConfig(kernel="dot", block_m=16, block_n=64, block_k=64, split_k=1)
    pallas_nk = run(x, dot)
    assert rel_err(pallas_nk, quantized_matmul(x, kn, out_dtype=jnp.float32, interpret=True, config=dot)) < 1e-6
    assert not np.array_equal(np.asarray(pallas_nk), np.asarray(split))  # not the XLA path in disguise
    with pytest.raises(QuantFormatError, match=r"Mosaic TPU kernel takes weights stored \[K, N\] only"):
        quantized_matmul(x, nk, impl="pallas_tpu", interpret=True)
    with pytest.raises(QuantFormatError, match="I = 256"):  # in_features read from the [N, K] storage
        quantized_matmul(jnp.ones((2, 136), jnp.bfloat16), nk, impl="xla")


def test_k_major_layer_and_model_logits_equal_kn():
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.model import GLMForCausalLM, Linear
    from autoglm_jax.model.quantized_linear import QuantizedLinear, quantize_model
    lin = Linear(256, 192, axes=("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ql = QuantizedLinear.from_linear(lin, "int8", k_major=True)
    assert ql.k_major and ql.weight().k_major and ql.qweight[...].shape == (192, 256)
    assert ql.qweight.get_metadata()["logical_axes"] == ("mlp", "embed")  # the transposed storage's axes
    assert ql.scale.get_metadata()["logical_axes"] == ("mlp",)
    with pytest.raises(QuantFormatError, match=r"k_major.*only; got fmt='w8a8'"):
        QuantizedLinear.from_linear(lin, "w8a8", k_major=True)
    cfg = GLMConfig.from_preset("tiny", num_layers=2, vocab_size=512)
    ids = jax.random.randint(jax.random.key(3), (2, 7), 1, cfg.vocab_size)
    run = lambda m: jax.jit(lambda s, i: nnx.merge(nnx.graphdef(m), s)(i))(nnx.state(m), ids)
    for impl in ("auto", "xla_split", "xla"):
        kn, nk = (GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0)) for _ in range(2))
        assert quantize_model(kn, "int8", impl=impl) == quantize_model(nk, "int8", impl=impl, k_major=True)
        a, b = nk.layers[1].mlp.down_proj, kn.layers[1].mlp.down_proj
        np.testing.assert_array_equal(np.asarray(a.qweight[...]), np.asarray(b.qweight[...]).T)
        la, lb = run(kn), run(nk)
        if impl == "xla_split":  # the same quantized values, exact int32 sums: identical logits
            np.testing.assert_array_equal(np.asarray(lb), np.asarray(la))
        else:  # reference (CPU auto) / xla: float32 sums XLA may order differently for the [N, K] operand
            assert rel_err(lb, la) < 1e-5
    with pytest.raises(QuantFormatError, match=r"k_major.*only; got fmt='w8a8'"):
        quantize_model(GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0)), "w8a8", k_major=True)


def test_k_major_auto_model_layouts_by_shape_and_logits_equal_kn():
    """``k_major="auto"``: each int8 weight K-major unless I > O (the tiny preset's down_proj 688 -> 256 is tall);
    the logits equal the [I, O] model's."""
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.model import GLMForCausalLM, Linear
    from autoglm_jax.model.quantized_linear import QuantizedLinear, quantize_model
    tall = QuantizedLinear.from_linear(Linear(256, 192, axes=("mlp", "embed"), rngs=nnx.Rngs(0)), "int8",
                                       k_major="auto")
    assert not tall.k_major and tall.qweight.get_metadata()["logical_axes"] == ("mlp", "embed")
    cfg = GLMConfig.from_preset("tiny", num_layers=2, vocab_size=512)
    assert cfg.intermediate_size > cfg.hidden_size  # down_proj [intermediate, hidden] is the tall one
    ids = jax.random.randint(jax.random.key(4), (2, 7), 1, cfg.vocab_size)
    run = lambda m: jax.jit(lambda s, i: nnx.merge(nnx.graphdef(m), s)(i))(nnx.state(m), ids)
    for impl in ("auto", "xla_split", "xla"):
        kn, auto = (GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0)) for _ in range(2))
        assert quantize_model(kn, "int8", impl=impl) == quantize_model(auto, "int8", impl=impl, k_major="auto")
        for layer in auto.layers:
            lins = (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
            assert [lin.k_major for lin in lins] == [True, True, True, False]
        la, lb = run(kn), run(auto)
        if impl == "xla_split":  # the same quantized values, exact int32 sums: identical logits
            np.testing.assert_array_equal(np.asarray(lb), np.asarray(la))
        else:
            assert rel_err(lb, la) < 1e-5
    with pytest.raises(QuantFormatError, match=r"k_major.*only; got fmt='w8a8'"):
        quantize_model(GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0)), "w8a8", k_major="auto")
    with pytest.raises(QuantFormatError, match="allowed: False.*True.*'auto'"):
        quantize_model(GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0)), "int8", k_major="yes")
