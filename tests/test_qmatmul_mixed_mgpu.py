"""The Mosaic GPU weight-only int8 matmul (Hopper: int8 widened to bfloat16 in shared memory, bf16 wgmma, the
per-channel scale in the epilogue) against its reference, for both weight layouts.

wgmma has no interpreter, so on the CPU the kernel is lowered for CUDA (``jax.export``: Pallas -> Mosaic GPU, the
pipeline, the widening's layouts, the epilogue) and the dispatch's fallback is checked; the numbers are checked on
the GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import Int8Weight, TileConfig, quantized_matmul
from kernels_pallas.quantized_matmul import quantized_matmul_reference
from kernels_pallas.mgpu_flash import SMEM_BYTES
from kernels_pallas.qmatmul_mixed_mgpu import MixedTiles, int8_matmul_mgpu, int8_matmul_reference

# (M, K, N, tiles, k_major): GLM-4-9B's qkv, o, gate_up and down at M = 512 or 128, and smaller tiles
# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_int4_lowers_for_cuda[256-13696-4096-int4_g128_asym_kmajor-False]',
    'test_int4_lowers_for_cuda[512-4096-4608-int4_g128_asym_kmajor-True]',
    'test_a_float32_output_takes_fewer_stages_and_still_lowers[int8_kmajor-True]',
}


CASES = [(512, 4096, 4608, MixedTiles(), False), (128, 4096, 4096, MixedTiles(tile_n=64), True),
         (256, 13696, 4096, MixedTiles(tile_m=64, tile_n=64, stages=6), True),
         (512, 4096, 27392, MixedTiles(tile_n=128, stages=3), False),
         # regs: the widened weight as wgmma's register operand, the accumulator transposed (K-major only)
         (512, 4096, 4608, MixedTiles(regs=True), True), (256, 13696, 4096, MixedTiles(tile_m=256, tile_n=64,
                                                                                       regs=True), True),
         (128, 4096, 27392, MixedTiles(tile_n=64, regs=True), True),
         (512, 13696, 4096, MixedTiles(tile_n=64, tile_k=128, regs=True), True)]  # int8 with a K step of 128


def int8_weight(rng, k, n, k_major=False, scale=True):
    """A random (never zero) Int8Weight [K, N] in the given layout; scale: random per-channel scales, else ones."""
    q = jnp.asarray(rng.integers(-127, 128, (k, n)), jnp.int8)
    s = rng.uniform(1e-3, 1e-2, n) if scale else np.ones(n)
    return Int8Weight(qweight=q, scale=jnp.asarray(s, jnp.float32)).with_layout(k_major)


def operands(m, k, n, k_major, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k) if k_major else (k, n)), jnp.int8)
    sw = jnp.asarray(rng.uniform(1e-3, 1e-2, n), jnp.float32)
    return x, wq, sw


@pytest.mark.parametrize("m,k,n,tiles,k_major", CASES, ids=str)
def test_lowers_for_cuda(m, k, n, tiles, k_major):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in (((m, k), jnp.bfloat16),
                                                     ((n, k) if k_major else (k, n), jnp.int8), ((n,), jnp.float32))]
    f = jax.jit(lambda *a: int8_matmul_mgpu(*a, k_major=k_major, tiles=tiles, num_sms=132))
    module = jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in module and "wgmma.mma_async" in module and ".f32.bf16.bf16" in module


def test_rejects_what_it_does_not_take():
    x, wq, sw = operands(128, 256, 256, False)
    with pytest.raises(ValueError, match="bfloat16"):
        int8_matmul_mgpu(x.astype(jnp.float32), wq, sw)
    with pytest.raises(ValueError, match="K=256"):
        int8_matmul_mgpu(x[:, :128], wq, sw)
    with pytest.raises(ValueError, match="N % 256"):
        int8_matmul_mgpu(x, wq[:, :192], sw[:192])
    with pytest.raises(ValueError, match="float32"):
        int8_matmul_mgpu(x, wq, sw.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="tile_k 64"):
        int8_matmul_mgpu(x, wq, sw, tiles=MixedTiles(tile_k=128))
    with pytest.raises(ValueError, match="M % 128"):
        int8_matmul_mgpu(x[:100], wq, sw)
    with pytest.raises(ValueError, match="K-major"):
        int8_matmul_mgpu(x, wq, sw, tiles=MixedTiles(regs=True))


@pytest.mark.parametrize("k_major", [False, True])
def test_dispatch_falls_back_to_the_dot_tiles_where_wgmma_cannot_run(k_major):
    """kernel="mgpu" in interpret mode (no wgmma interpreter) runs the Triton dot tiles: the same numbers."""
    rng = np.random.default_rng(1)
    qw = int8_weight(rng, 256, 512, k_major)
    x = jnp.asarray(rng.standard_normal((100, 256)), jnp.bfloat16)
    cfg = TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=4)
    y = quantized_matmul(x, qw, config=cfg, interpret=True, _poison=True)
    ref = quantized_matmul_reference(x, qw)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


def test_reference_is_the_float_dot_of_the_scaled_weight():
    x, wq, sw = operands(8, 64, 32, True, seed=3)
    want = np.asarray(x, np.float64) @ (np.asarray(wq, np.float64).T * np.asarray(sw, np.float64)[None, :])
    got = np.asarray(int8_matmul_reference(x, wq, sw, k_major=True, out_dtype=jnp.float32), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,tiles,k_major", CASES, ids=str)
def test_matches_reference_on_gpu(m, k, n, tiles, k_major):
    x, wq, sw = operands(m, k, n, k_major, seed=m + n)
    y = np.asarray(int8_matmul_mgpu(x, wq, sw, k_major=k_major, tiles=tiles), np.float32)
    ref = np.asarray(int8_matmul_reference(x, wq, sw, k_major=k_major), np.float32)
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.gpu
@pytest.mark.parametrize("k_major", [False, True])
def test_quantized_matmul_runs_it_where_the_config_says_mgpu(k_major):
    """Through the dispatch: M padded to the tile, the scale, against the reference."""
    rng = np.random.default_rng(4)
    qw = int8_weight(rng, 4096, 4608, k_major)
    x = jnp.asarray(rng.standard_normal((300, 4096)), jnp.bfloat16)
    y = quantized_matmul(x, qw, config=TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=4))
    ref = quantized_matmul_reference(x, qw)
    err = np.abs(np.asarray(y, np.float32) - np.asarray(ref, np.float32)).max()
    assert err <= 1e-2 * np.abs(np.asarray(ref, np.float32)).max()


@pytest.mark.parametrize("fmt,regs", [("int8", False), ("int8_kmajor", False), ("int8_kmajor", True),
                                      ("w8a8", False)])
def test_a_float32_output_takes_fewer_stages_and_still_lowers(fmt, regs):
    """quantized_matmul asks the kernel for float32 when a bias follows; 128 x 128 tiles with 4 stages would then
    overflow shared memory, so the dispatch drops stages (fit_stages) and the kernel lowers for CUDA."""
    from kernels_pallas import qmatmul_w8a8_mgpu
    from kernels_pallas.quantized_matmul import _pallas
    from experiments.bench_qmatmul import random_weight

    mod = qmatmul_w8a8_mgpu if fmt == "w8a8" else __import__("kernels_pallas.qmatmul_mixed_mgpu", fromlist=["x"])
    cfg = (TileConfig(kernel="mgpu", block_m=128, block_n=64, block_k=64, num_stages=8, weight_regs=True) if regs
           else TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=4))
    tiles = mod.tiles_of(cfg)
    assert mod.smem_bytes(tiles, jnp.float32) > SMEM_BYTES >= mod.smem_bytes(tiles, jnp.bfloat16)
    fitted = mod.fit_stages(tiles, jnp.float32)
    assert 2 <= fitted.stages < tiles.stages and mod.smem_bytes(fitted, jnp.float32) <= SMEM_BYTES
    qw = random_weight(jax.random.key(0), fmt, 4096, 4608)
    x = jax.ShapeDtypeStruct((300, 4096), jnp.bfloat16)
    f = jax.jit(lambda x, qw: _pallas(x, qw, cfg, "gpu", False, jnp.float32, False))
    triton = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]  # W8A8's quantize_rows
    module = jax.export.export(f, platforms=["cuda"], disabled_checks=triton)(x, qw).mlir_module()
    assert "wgmma.mma_async" in module


def test_tiles_that_cannot_fit_shared_memory_are_a_clear_error():
    x, wq, sw = operands(128, 256, 256, False)
    with pytest.raises(ValueError, match="shared memory"):
        int8_matmul_mgpu(x, wq, sw, tiles=MixedTiles(stages=4), out_dtype=jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,regs", [("int8", False), ("int8_kmajor", False), ("int8_kmajor", True),
                                      ("w8a8", False)])
def test_bias_through_the_dispatch_on_gpu(fmt, regs):
    """With a bias the kernel writes float32 (fewer stages, fit_stages); the result against the reference."""
    from experiments.bench_qmatmul import random_weight

    qw = random_weight(jax.random.key(5), fmt, 4096, 4608)
    x = jax.random.normal(jax.random.key(6), (300, 4096), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(7), (4608,), jnp.float32)
    cfg = TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=4, weight_regs=regs)
    y = np.asarray(quantized_matmul(x, qw, bias=bias, config=cfg), np.float32)
    ref = np.asarray(quantized_matmul_reference(x, qw, bias=bias), np.float32)
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()


def test_fit_config_takes_the_kernel_only_where_it_can_run():
    """bf16 x, wgmma available and tiles that divide N: the kernel; float16 x, interpret mode (no wgmma) or an N the
    CTA tile does not divide: the Triton dot tiles."""
    from kernels_pallas.quantized_matmul import fit_config

    rng = np.random.default_rng(2)
    cfg = TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=4)

    w, narrow = int8_weight(rng, 4096, 4608, scale=False), int8_weight(rng, 4096, 4480, scale=False)
    assert fit_config(cfg, w, 512, x_dtype=jnp.bfloat16).kernel == "mgpu"
    assert fit_config(cfg, w, 512, x_dtype=jnp.float16).kernel == "dot"
    assert fit_config(cfg, w, 512, wgmma=False, x_dtype=jnp.bfloat16).kernel == "dot"
    assert fit_config(cfg, narrow, 512, x_dtype=jnp.bfloat16).kernel == "dot"  # 4480 % 256 != 0
    regs = TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=4, weight_regs=True)
    assert fit_config(regs, w, 512, x_dtype=jnp.bfloat16).kernel == "dot"  # [K, N]: no register operand
    assert fit_config(regs, w.with_layout(True), 512, x_dtype=jnp.bfloat16).kernel == "mgpu"


# ---- int4 (K-major, group 128): one group a K step, nibbles widened with the group's scale and offset ----------

INT4_CASES = [(512, 4096, 27392, "int4_g128_sym_kmajor", False), (256, 13696, 4096, "int4_g128_asym_kmajor", False),
              (128, 4096, 4608, "int4_g128_sym_kmajor", False), (512, 4096, 4608, "int4_g128_asym_kmajor", True),
              (256, 13696, 4096, "int4_g128_sym_kmajor", True)]


def int4_tiles(m, regs):
    from kernels_pallas.qmatmul_mixed_mgpu import INT4_TILES

    return dataclasses.replace(INT4_TILES, tile_m=256 if regs and m % 256 == 0 else 128, stages=2 if regs else 3,
                               regs=regs)


def int4_weight(fmt, k, n, seed=0):
    from experiments.bench_qmatmul import random_weight
    return random_weight(jax.random.key(seed), fmt, k, n)


@pytest.mark.parametrize("m,k,n,fmt,regs", INT4_CASES, ids=str)
def test_int4_lowers_for_cuda(m, k, n, fmt, regs):
    from kernels_pallas.qmatmul_mixed_mgpu import int4_matmul_mgpu

    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    f = jax.jit(lambda x, q: int4_matmul_mgpu(x, q, tiles=int4_tiles(m, regs), num_sms=132))
    module = jax.export.export(f, platforms=["cuda"])(x, int4_weight(fmt, k, n)).mlir_module()
    assert "mosaic_gpu" in module and "wgmma.mma_async" in module and ".f32.bf16.bf16" in module


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_widening_arithmetic_in_interpret_mode(fmt):
    """The widening step alone (Mosaic GPU interpreter, plain loads for the register layouts): warpgroup 1's slice
    of a packed tile, exactly, with power-of-two scales and integer offsets (no rounding): int4's low nibbles are
    the group's first half along K, the high nibbles its second half."""
    from kernels_pallas.mgpu_flash import interpret_params
    from kernels_pallas.qmatmul_mixed_mgpu import _widen

    tile_n, rng = 64, np.random.default_rng(7)
    if fmt == "int8":
        ins = [jnp.asarray(rng.integers(-127, 128, (2 * tile_n, 64)), jnp.int8)]
        wb_shape = (tile_n, 64)
    else:
        ins = [jnp.asarray(rng.integers(0, 256, (2 * tile_n, 64)), jnp.uint8),
               jnp.asarray(2.0 ** rng.integers(-3, 3, (1, 2 * tile_n)), jnp.bfloat16),
               jnp.asarray(rng.integers(-15, 1, (1, 2 * tile_n)), jnp.bfloat16)]
        wb_shape = (tile_n, 128)

    def body(*refs):
        gmem, out, smem, wb = refs[:len(ins)], refs[len(ins)], refs[len(ins) + 1:-1], refs[-1]
        for g, s in zip(gmem, smem):
            s[...] = g[...]
        _widen(fmt, True, tile_n, wb, smem, 1, interpret=True)
        out[...] = wb[...]

    f = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct(wb_shape, jnp.bfloat16), interpret=interpret_params(),
                     scratch_types=[*(plgpu.SMEM(a.shape, a.dtype) for a in ins), plgpu.SMEM(wb_shape, jnp.bfloat16)])
    got = np.asarray(f(*ins), np.float64)
    w = np.asarray(ins[0], np.int64)[tile_n:]
    if fmt == "int8":
        want = w
    else:
        s, o = (np.asarray(a, np.float64)[0, tile_n:, None] for a in ins[1:])
        want = np.concatenate([(w & 15) * s + o, (w >> 4) * s + o], axis=1)
    np.testing.assert_array_equal(got, want)


def test_int4_rejects_what_it_does_not_take():
    from kernels_pallas.qmatmul_mixed_mgpu import MixedTiles, int4_matmul_mgpu

    x = jnp.zeros((128, 4096), jnp.bfloat16)
    with pytest.raises(ValueError, match="K-major Int4Weight with group 128"):
        int4_matmul_mgpu(x, int4_weight("int4_g128_sym", 4096, 256))  # [K/2, N]
    with pytest.raises(ValueError, match="K-major Int4Weight with group 128"):
        int4_matmul_mgpu(x, int4_weight("int4_g64_sym_kmajor", 4096, 256))
    with pytest.raises(ValueError, match="shared memory"):
        int4_matmul_mgpu(x, int4_weight("int4_g128_sym_kmajor", 4096, 256),
                         tiles=MixedTiles(tile_n=128, tile_k=128, stages=2))
    with pytest.raises(ValueError, match="bfloat16"):
        int4_matmul_mgpu(x.astype(jnp.float16), int4_weight("int4_g128_sym_kmajor", 4096, 256))


def test_int4_dispatch_lowers_with_a_float32_output():
    """A bias makes the dispatch ask for float32: fewer stages (fit_stages), and the kernel still lowers."""
    from kernels_pallas.quantized_matmul import _pallas, fit_config

    qw = int4_weight("int4_g128_sym_kmajor", 4096, 4608)
    cfg = fit_config(TileConfig(kernel="mgpu", block_m=128, block_n=64, num_stages=3), qw, 300)
    assert cfg.kernel == "mgpu" and cfg.block_k == 128
    assert fit_config(cfg, int4_weight("int4_g128_sym", 4096, 4608), 300).kernel == "dot"  # [K/2, N]: no kernel
    f = jax.jit(lambda x, qw: _pallas(x, qw, cfg, "gpu", False, jnp.float32, False))
    module = jax.export.export(f, platforms=["cuda"])(jax.ShapeDtypeStruct((300, 4096), jnp.bfloat16),
                                                       qw).mlir_module()
    assert "wgmma.mma_async" in module


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,fmt,regs", INT4_CASES, ids=str)
def test_int4_matches_reference_on_gpu(m, k, n, fmt, regs):
    from kernels_pallas.qmatmul_mixed_mgpu import int4_matmul_mgpu, int4_matmul_reference

    qw = int4_weight(fmt, k, n, seed=m + n)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
    y = np.asarray(int4_matmul_mgpu(x, qw, tiles=int4_tiles(m, regs)), np.float32)
    ref = np.asarray(int4_matmul_reference(x, qw), np.float32)
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - ref) <= 5e-3 * np.linalg.norm(ref)  # one bf16 rounding of each scaled weight


@pytest.mark.gpu
@pytest.mark.parametrize("regs", [False, True])
def test_int4_bias_through_the_dispatch_on_gpu(regs):
    qw = int4_weight("int4_g128_asym_kmajor", 4096, 4608, seed=3)
    x = jax.random.normal(jax.random.key(4), (300, 4096), jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(5), (4608,), jnp.float32)
    cfg = TileConfig(kernel="mgpu", block_m=128, block_n=64, num_stages=3, weight_regs=regs)
    y = np.asarray(quantized_matmul(x, qw, bias=bias, config=cfg), np.float32)
    ref = np.asarray(quantized_matmul_reference(x, qw, bias=bias), np.float32)
    assert np.linalg.norm(y - ref) <= 5e-3 * np.linalg.norm(ref)
