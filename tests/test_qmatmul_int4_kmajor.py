"""K-major int4 (``Int4Weight.k_major``: packed [N, K/2], scale / zero [N, K/G]): the format, the one-row
integer-dot GEMV (``qmatmul_dp4a``), the K-major dot tiles, dispatch, the layer, PTQ and the checkpoint.

Kernel cases run with a NaN-poisoned output, fresh random non-zero inputs, ragged N and a K whose groups do not
fill the last step (masked); the GEMV's only approximation is the activation's 15-bit fixed point (as the
``xla_split`` int8 path), checked against ``int8_split_matmul``'s bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.qmatmul_dp4a import tile_fits
from kernels_pallas.qmatmul_tiles import TileConfig, default_config, lookup
from kernels_pallas.quant_formats import Int4Weight, QuantFormatError, quantize, quantize_int4, resolve_k_major
from kernels_pallas.quantized_matmul import SPLIT_STEPS, fit_config, quantized_matmul, quantized_matmul_reference

from .qmatmul_fixtures import split_bound


# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_matches_reference[gemv-g64]',
    'test_matches_reference[gemv-split]',
    'test_matches_reference[dot-bf16scale]',
}


def problem(seed, m, k, n, group, symmetric, x_dtype=jnp.bfloat16):
    kx, kw = jax.random.split(jax.random.key(seed))
    w = 0.05 * jax.random.normal(kw, (k, n), jnp.float32) + 0.01
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(x_dtype)
    return x, quantize_int4(w, group=group, symmetric=symmetric, k_major=True)


GEMV = lambda bn, bk, w=4, s=1: TileConfig(kernel="gemv", block_m=1, block_n=bn, block_k=bk,  # noqa: E731
                                           split_k=s, num_warps=w, num_stages=1)
# (M, K, N, group, symmetric, config)
CASES = [
    (1, 512, 200, 128, True, GEMV(4, 256)),  # 4 groups in 2 steps, ragged N (200 = 50 programs of 4)
    (1, 640, 136, 128, False, GEMV(8, 512, 2)),  # 5 groups in a 4-group step: the second step masked
    (1, 448, 72, 64, True, GEMV(2, 256)),  # 7 groups of 64, steps of 4
    (1, 768, 40, 64, False, GEMV(1, 64)),  # one group a step, one row a program
    (1, 1792, 72, 128, True, GEMV(4, 256, 1, 3)),  # 7 steps of 2 groups in 3 splits of 3 (2 steps past K)
    (1, 6848, 24, 64, False, GEMV(8, 1024, 2, 4)),  # down-like: 107 groups, 7 steps, 4 splits of 2
    (5, 512, 200, 128, True, TileConfig(kernel="dot", block_m=16, block_n=64, block_k=128, split_k=2)),
    (3, 512, 136, 64, False, TileConfig(kernel="dot", block_m=16, block_n=32, block_k=64, split_k=1, asm_dequant=True)),
    (20, 256, 130, 128, False, TileConfig(kernel="dot", block_m=32, block_n=64, block_k=128, split_k=1,
                                          asm_dequant=True, scale_in_bf16=True)),
    (1, 512, 136, 128, True, TileConfig(kernel="dot", block_m=16, block_n=64, block_k=64, split_k=3, asm_dequant=True)),
]
IDS = ["gemv-sym-ragged", "gemv-asym-masked", "gemv-g64", "gemv-1row", "gemv-split", "gemv-split-107", "dot",
       "dot-asm-asym", "dot-bf16scale", "dot-part-group"]


class Int4KMajorCases:
    interpret = True

    @pytest.mark.parametrize("m,k,n,group,symmetric,cfg", CASES, ids=IDS)
    def test_matches_reference(self, m, k, n, group, symmetric, cfg):
        x, q = problem(k + n + m, m, k, n, group, symmetric)
        out = quantized_matmul(x, q, out_dtype=jnp.float32, impl="pallas_gpu", interpret=self.interpret, config=cfg,
                               _poison=True)
        ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
        assert out.shape == ref.shape and bool(jnp.isfinite(out).all()), "unwritten (NaN-poisoned) outputs"
        err = jnp.abs(out - ref)
        if cfg.kernel == "gemv":  # the fixed-point activation: within its bound, and not exact (not XLA's path)
            assert bool(jnp.all(err <= split_bound(x, q))), float(jnp.max(err - split_bound(x, q)))
            assert float(jnp.max(err)) > 0
        else:
            tol = 5e-3 if cfg.scale_in_bf16 else 1e-4
            assert float(jnp.linalg.norm(err) / jnp.linalg.norm(ref)) < tol

    @pytest.mark.parametrize("split", [1, 3])
    def test_gemv_writes_its_output_dtype_with_one_split(self, split):
        # One split: the kernel stores bfloat16 itself (no convert kernel after it); several: float32 partials
        # summed by XLA. Either way the same numbers as the float32 output rounded once.
        from kernels_pallas.qmatmul_dp4a import dp4a_gemv
        x, q = problem(5, 1, 1792, 72, 128, True)
        cfg = fit_config(GEMV(4, 256, 1, split), q, 1)
        odt = jnp.bfloat16 if split == 1 else jnp.float32
        out = jnp.full((cfg.split_k, 72), jnp.nan, odt)
        y = dp4a_gemv(x, q, out, cfg=cfg, out_dtype=jnp.bfloat16, interpret=self.interpret)
        assert y.dtype == odt and y.shape == (1, 72) and bool(jnp.isfinite(y).all())
        y32 = quantized_matmul(x, q, out_dtype=jnp.float32, impl="pallas_gpu", interpret=self.interpret, config=cfg)
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.bfloat16), np.float32),
                                      np.asarray(y32.astype(jnp.bfloat16), np.float32))


    @pytest.mark.parametrize("k,group", [(13696, 128), (4096, 128), (448, 64), (384, 128)])
    def test_digit_kernel_writes_digit_planes(self, k, group):
        """The one-launch digit prep against ``digit_planes`` (XLA's) and numpy's IEEE quotients: a step per group
        (its absmax / SPLIT_STEPS), the digits' values the correctly rounded quotient (exact on the GPU, a step off
        on < 1e-2 against XLA), group sums alike; and the digits recombine to x within half its group's step."""
        from kernels_pallas.qmatmul_dp4a import digit_planes, digit_planes_pallas
        x = (3.0 * jax.random.normal(jax.random.key(k + group), (1, k), jnp.float32)).astype(jnp.bfloat16)
        planes, xg, step = digit_planes_pallas(x, group, interpret=self.interpret)
        ref_planes, ref_xg, ref_step = digit_planes(x, group)
        assert planes.shape == ref_planes.shape and planes.dtype == jnp.int8
        assert step.shape == (k // group,)
        np.testing.assert_allclose(np.asarray(step), np.asarray(ref_step), rtol=1e-6)
        amax = np.abs(np.asarray(x, np.float32)).reshape(k // group, group).max(axis=1)
        np.testing.assert_allclose(np.asarray(step), amax / SPLIT_STEPS, rtol=1e-6)
        step_k = np.repeat(np.asarray(step, np.float32), group)[None, :]  # each element's group step
        p, rp = np.asarray(planes, np.int64), np.asarray(ref_planes, np.int64)  # [hi_lo, lo_lo, hi_hi, lo_hi]
        xs = np.concatenate([128 * p[0] + p[1], 128 * p[2] + p[3]], axis=1).reshape(1, k)
        rxs = np.concatenate([128 * rp[0] + rp[1], 128 * rp[2] + rp[3]], axis=1).reshape(1, k)
        want = np.round(np.asarray(x, np.float32) / step_k)  # IEEE quotient, the kernel's step
        if not self.interpret:  # round_quotient: exactly the correctly rounded quotient
            np.testing.assert_array_equal(xs, want)
        for other in (want, rxs):  # interpret mode / XLA may multiply by a reciprocal: a step off on a few (the
            d = np.abs(xs - other)  # quotients, up to 16256, carry float32 rounding of ~2**-10 a step)
            assert d.max() <= 1 and (d > 0).mean() < 1e-2, (d.max(), (d > 0).mean())
        np.testing.assert_allclose(np.asarray(xg), np.asarray(ref_xg), atol=2.0 * group / 64)
        p = np.asarray(planes, np.float32)  # [hi_lo, lo_lo, hi_hi, lo_hi] x [K/G, G/2]
        xs = np.concatenate([128 * p[0] + p[1], 128 * p[2] + p[3]], axis=1).reshape(1, k)
        assert np.all(np.abs(xs * step_k - np.asarray(x, np.float32)) <= step_k * 0.5 * 1.001)

    def test_gemv_digits_kernel_and_xla_agree(self):
        from kernels_pallas.qmatmul_dp4a import dp4a_gemv
        x, q = problem(11, 1, 6848, 40, 64, False)
        cfg = fit_config(GEMV(8, 1024, 2, 1), q, 1)
        ys = [dp4a_gemv(x, q, cfg=cfg, digits=dg, interpret=self.interpret) for dg in ("kernel", "xla")]
        ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
        for y in ys:
            assert bool(jnp.all(jnp.abs(y - ref) <= split_bound(x, q)))
        with pytest.raises(ValueError, match="digits must be"):
            dp4a_gemv(x, q, cfg=cfg, digits="numpy", interpret=self.interpret)


class TestInt4KMajorInterpret(Int4KMajorCases):
    interpret = True


@pytest.mark.gpu
class TestInt4KMajorGPU(Int4KMajorCases):
    interpret = False

    @pytest.mark.parametrize("k,n,bn,bk,w,s", [(4096, 27392, 2, 4096, 4, 1), (13696, 4096, 2, 4096, 2, 4),
                                                (13696, 4096, 4, 2048, 2, 1),
                                                (13696, 4160, 8, 16384, 4, 1), (4096, 4608, 2, 2048, 4, 1),
                                                (13696, 4096, 4, 2048, 2, 7), (13696, 4160, 2, 4096, 4, 4),
                                                (13696, 4096, 8, 1024, 4, 5)])
    def test_glm_shapes(self, k, n, bn, bk, w, s):
        """GLM-4-9B's shapes (down: 107 groups, the last step masked, split or not; N = 4160 ragged)."""
        x, q = problem(k + n + s, 1, k, n, 128, True)
        out = quantized_matmul(x, q, out_dtype=jnp.float32, config=GEMV(bn, bk, w, s), _poison=True)
        err = jnp.abs(out - quantized_matmul_reference(x, q, out_dtype=jnp.float32))
        assert bool(jnp.all(err <= split_bound(x, q)))

    def test_dispatch_default(self):
        x, q = problem(3, 1, 4096, 4608, 128, True)
        err = jnp.abs(quantized_matmul(x, q, out_dtype=jnp.float32) - quantized_matmul_reference(x, q, out_dtype=jnp.float32))
        assert bool(jnp.all(err <= split_bound(x, q)))


def test_format_is_the_kn_one_transposed_and_validates():
    w = jax.random.normal(jax.random.key(1), (256, 48))
    for sym in (True, False):
        kn, nk = quantize_int4(w, group=64, symmetric=sym), quantize_int4(w, group=64, symmetric=sym, k_major=True)
        assert nk.k_major and nk.packed.shape == (48, 128) and nk.scale.shape == (48, 4)
        assert (nk.in_features, nk.out_features) == (256, 48) and nk.name.endswith("_kmajor")
        np.testing.assert_array_equal(np.asarray(nk.packed), np.asarray(kn.packed).T)
        np.testing.assert_array_equal(np.asarray(nk.dequantize()), np.asarray(kn.dequantize()))
        np.testing.assert_array_equal(np.asarray(nk.unpack()), np.asarray(kn.unpack()))
        back = nk.with_layout(False)
        assert not back.k_major and np.array_equal(np.asarray(back.packed), np.asarray(kn.packed))
    nk = quantize_int4(w, group=64, symmetric=False, k_major=True)
    with pytest.raises(QuantFormatError, match=r"scale must be float \[48, 4\] = \[O, I/group\] \(k_major\)"):
        Int4Weight(packed=nk.packed, scale=nk.scale.T, zero=nk.zero, group=64, k_major=True).validate()
    with pytest.raises(QuantFormatError, match=r"zero must be uint8 \[48, 4\]"):
        Int4Weight(packed=nk.packed, scale=nk.scale, zero=nk.zero.T, group=64, k_major=True).validate()
    with pytest.raises(QuantFormatError, match=r"packed must be uint8 \[O, I/2\] \(k_major\)"):
        Int4Weight(packed=nk.packed.astype(jnp.int8), scale=nk.scale, zero=None, group=64, k_major=True).validate()
    # auto: int4 K-major for every shape; int8 unless I > O
    assert [resolve_k_major("auto", 256, o, "int4") for o in (48, 256, 511, 512)] == [True] * 4
    assert resolve_k_major("auto", 256, 256, "int8") and not resolve_k_major("auto", 256, 48, "int8")
    assert quantize(jnp.tile(w, (1, 12)), "int4", group=64, k_major="auto").k_major  # [256, 576]
    assert quantize(w, "int4", group=64, k_major="auto").k_major
    assert not quantize(w, "int4", group=64, k_major=False).k_major
    leaves, _ = jax.tree_util.tree_flatten(nk)
    assert len(leaves) == 3 and jax.jit(lambda q: q)(nk).k_major is True  # static metadata


def test_dispatch_table_fit_and_errors():
    assert default_config("int4_g128_sym_kmajor", 1).kernel == "gemv"
    assert default_config("int4_g128_sym_kmajor", 8).kernel == "dot"
    # an untuned int4 variant borrows configs of its own layout only
    entry = {"device": "h100", "m": 1, "k": 256, "n": 136, "config": GEMV(2, 256).to_json()}
    kn_entry = {**entry, "format": "int4_g128_sym", "config": TileConfig(kernel="xla").to_json()}
    assert lookup("h100", "int4_g64_sym_kmajor", 1, 256, 136, table=(kn_entry,)) == default_config(
        "int4_g64_sym_kmajor", 1)
    assert lookup("h100", "int4_g64_sym_kmajor", 1, 256, 136, table=({**entry, "format": "int4_g128_sym_kmajor"},)) \
        == GEMV(2, 256)
    _, q = problem(0, 1, 13696, 64, 128, True)  # 107 groups: block_k capped at 128 groups, one split then
    assert fit_config(GEMV(4, 1 << 20, 4, 3), q, 1) == GEMV(4, 128 * 128, 4, 1)
    c = fit_config(TileConfig(kernel="gemv", block_m=1, block_k=64, split_k=8), q, 1)  # part of a group: whole ones
    assert c.block_k % 128 == 0 and tile_fits(c.block_n, c.block_k, c.num_warps)
    # splits of K's 7 steps of 16 groups: only non-empty ones (8 -> 7 of one step; 5 -> 4 of two steps)
    assert [fit_config(GEMV(4, 2048, 2, s), q, 1).split_k for s in (1, 4, 5, 7, 8)] == [1, 4, 4, 7, 7]
    assert fit_config(GEMV(4, 2048), q, 8).kernel == "dot"
    # at least 16 packed bytes a thread (smaller tiles summed wrong lanes on the H100): groups, then warps, then rows
    assert fit_config(GEMV(2, 256, 4), q, 1) == GEMV(2, 2048, 4)
    _, small = problem(0, 1, 256, 64, 64, True)  # 4 groups of 64: 4 * 32 bytes a row
    assert fit_config(GEMV(1, 64, 4), small, 1) == GEMV(4, 256, 1)
    # more than 4 rows only where one pass of the threads spans at most 4 of them (the H100's --check-tiles sweep:
    # [8, 2, 32] bytes with one warp, 16 a thread, summed wrong; [8, 4, 32] right)
    assert not tile_fits(8, 128, 1) and tile_fits(8, 256, 1) and tile_fits(4, 256, 1)
    assert not tile_fits(16, 512, 4) and tile_fits(16, 1024, 4) and not tile_fits(8, 1024, 8)
    assert fit_config(GEMV(8, 128, 1), small, 1) == GEMV(8, 256, 1)
    _, tiny = problem(0, 1, 128, 64, 64, True)  # 2 groups of 64: no tile fits -> the dot tiles
    assert fit_config(GEMV(1, 64, 4), tiny, 1).kernel == "dot"
    x, q = problem(1, 1, 256, 40, 128, True)
    with pytest.raises(QuantFormatError, match=r"Mosaic TPU kernel takes weights stored \[K, N\] only"):
        quantized_matmul(x, q, impl="pallas_tpu", interpret=True)
    with pytest.raises(QuantFormatError, match="impl='xla_split' is for Int8Weight"):
        quantized_matmul(x, q, impl="xla_split")
    xla = quantized_matmul(x, q, out_dtype=jnp.float32, impl="xla")  # the TPU's path for it
    assert float(jnp.max(jnp.abs(xla - quantized_matmul_reference(x, q, out_dtype=jnp.float32)))) < 1e-2
    from kernels_pallas.qmatmul_dp4a import dp4a_gemv
    with pytest.raises(QuantFormatError, match="one row x"):
        dp4a_gemv(jnp.ones((2, 256), jnp.bfloat16), q, cfg=GEMV(2, 256), interpret=True)
    with pytest.raises(QuantFormatError, match="takes a K-major Int4Weight"):
        dp4a_gemv(x, q.with_layout(False), cfg=GEMV(2, 256), interpret=True)
    with pytest.raises(QuantFormatError, match="block_k a positive multiple of the group"):
        dp4a_gemv(x, q, cfg=GEMV(2, 64), interpret=True)
    with pytest.raises(QuantFormatError, match=r"1 <= split_k <= K's steps of block_k \(1\)"):
        dp4a_gemv(x, q, cfg=GEMV(8, 256, 1, 2), interpret=True)
    with pytest.raises(QuantFormatError, match=r"block_n \* block_k / 2 >= 16 \* 32 \* num_warps"):
        dp4a_gemv(x, q, cfg=GEMV(2, 256), interpret=True)
    with pytest.raises(QuantFormatError, match=r"for block_n > 4, 4 \* block_k / 2 >= 16 \* 32 \* num_warps"):
        dp4a_gemv(x, q, cfg=GEMV(16, 256, 2), interpret=True)


def test_layer_model_and_ptq_in_k_major_int4():
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.model import GLMForCausalLM, Linear
    from autoglm_jax.model.quantized_linear import QuantizedLinear, quantize_model
    from autoglm_jax.quant import PTQConfig
    from autoglm_jax.quant.fake_quant import quantize_weight
    lin = Linear(256, 192, axes=("embed", "mlp"), dtype=jnp.float32, rngs=nnx.Rngs(0))
    ql = QuantizedLinear.from_linear(lin, "int4", group=64, symmetric=False, k_major=True)
    assert ql.k_major and ql.weight().k_major and ql.qweight[...].shape == (192, 128)
    assert ql.qweight.get_metadata()["logical_axes"] == ("mlp", "embed")
    assert ql.scale.get_metadata()["logical_axes"] == ql.zero.get_metadata()["logical_axes"] == ("mlp", None)
    cfg = GLMConfig.from_preset("tiny", num_layers=1, vocab_size=512)
    ids = jnp.asarray([[5, 17, 300, 2, 99]], jnp.int32)
    run = lambda m: jax.jit(lambda s, i: nnx.merge(nnx.graphdef(m), s)(i))(nnx.state(m), ids)
    kn, nk = (GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(0)) for _ in range(2))
    keep = ("lm_head", "down_proj")  # the tiny preset's down_proj K = 688 is no multiple of 64
    assert quantize_model(kn, "int4", group=64, keep_float=keep) == quantize_model(
        nk, "int4", group=64, keep_float=keep, k_major="auto")
    a, b = nk.layers[0], kn.layers[0]
    for lin, kn_lin in zip((a.attn.qkv_proj, a.attn.o_proj, a.mlp.gate_up_proj),
                           (b.attn.qkv_proj, b.attn.o_proj, b.mlp.gate_up_proj)):  # the rule: every weight
        assert lin.k_major and not kn_lin.k_major
    np.testing.assert_allclose(np.asarray(run(nk)), np.asarray(run(kn)), rtol=1e-5, atol=1e-5)  # CPU: reference
    # the checkpoint record: int4 "auto" is written as True; a recorded int4 "auto" (written before session 14,
    # when it meant K-major only where O >= 2 I) rebuilds that layout ("wide")
    from autoglm_jax.loading import abstract_model
    from autoglm_jax.quant.ptq import quantization_dict
    assert quantization_dict(PTQConfig(method="int4", group=64, k_major="auto"), [])["k_major"] is True
    assert resolve_k_major("wide", 256, 512, "int4") and not resolve_k_major("wide", 256, 511, "int4")
    old = {"fmt": "int4", "group": 64, "symmetric": True, "keep_float": list(keep), "k_major": "auto"}
    for record, o_proj in ((old, (128, 256)), ({**old, "k_major": True}, (256, 128))):
        layer = abstract_model(cfg, dtype="float32", quantization=record)[1]["layers"][0]
        assert layer["mlp"]["gate_up_proj"]["qweight"].shape == (1376, 128)  # 256 -> 1376: [O, I/2] either way
        assert layer["attn"]["o_proj"]["qweight"].shape == o_proj  # 256 -> 256: [I/2, O] by the old rule, [O, I/2] now
    # PTQ: the K-major weight is the kn one transposed; the label and dict record the layout
    w = jax.random.normal(jax.random.key(2), (128, 24))
    s = jnp.full((2, 24), 0.1, jnp.float32)
    z = jnp.full((2, 24), 8.0, jnp.float32)
    a, b = (quantize_weight(w, s, z, "int4", 64, k_major=km) for km in (False, True))
    assert b.k_major and np.array_equal(np.asarray(b.packed), np.asarray(a.packed).T)
    assert PTQConfig(method="int4", group=64, k_major=True).label == "int4_g64_sym_kmajor"


def test_cli_int4_nk_checkpoint_round_trip(tmp_path):
    """``autoglm quantize --method int4 --int4-layout nk``: recorded, stored [N, K/2], loaded back identical."""
    import orbax.checkpoint as ocp
    from autoglm_jax import loading
    from autoglm_jax.quant import PTQConfig, quantize
    from autoglm_jax.quant.cli import quantize_main
    out = tmp_path / "nk"
    argv = ["tiny", str(out), "--method", "int4", "--group-size", "64", "--int4-layout", "nk", "--keep-indivisible",
            "--quiet"]
    assert quantize_main(argv) == 0
    meta = loading.orbax_io.read_marker(out)
    assert meta["quantization"]["k_major"] is True and meta["ptq"]["int4_layout"] == "nk"
    stored = ocp.PyTreeCheckpointer().metadata(out / "params" / "layers.0").item_metadata.tree
    assert tuple(stored["mlp"]["gate_up_proj"]["qweight"].shape) == (1376, 128)  # [N, K/2]
    assert tuple(stored["mlp"]["gate_up_proj"]["scale"].shape) == (1376, 4)  # [N, K/G]
    loaded = loading.from_pretrained(out, progress=False)
    ref = loading.from_pretrained("tiny")
    quantize(ref, PTQConfig(method="int4", group=64, k_major=True, keep_indivisible=True))
    assert loaded.layers[0].mlp.gate_up_proj.k_major
    flat = lambda m: jax.tree_util.tree_leaves(nnx.to_pure_dict(nnx.state(m)))  # noqa: E731
    for a, b in zip(flat(ref), flat(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
