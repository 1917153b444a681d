"""The Mosaic GPU W8A8 matmul (Hopper wgmma, int8 x int8 -> int32, scales in the epilogue) against its reference.

wgmma has no interpreter, so on the CPU the kernel is lowered for CUDA (``jax.export``: Pallas -> Mosaic GPU, the
pipeline, the epilogue's layouts) and the dispatch's fallback is checked; the numbers are checked on the GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import TileConfig, quantize_w8a8, quantized_matmul
from kernels_pallas.quantized_matmul import quantized_matmul_reference
from kernels_pallas.qmatmul_w8a8_mgpu import W8A8Tiles, w8a8_matmul_mgpu, w8a8_matmul_reference

# (M, K, N, tiles): GLM-4-9B's qkv, o, gate_up and down at M = 512 or 128, and smaller tiles
CASES = [(512, 4096, 4608, W8A8Tiles()), (128, 4096, 4096, W8A8Tiles(stages=4)),
         (256, 13696, 4096, W8A8Tiles(tile_m=64, stages=4)), (512, 4096, 27392, W8A8Tiles(tile_n=64, stages=4))]


def operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    xq = jnp.asarray(rng.integers(-127, 128, (m, k)), jnp.int8)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    sx = jnp.asarray(rng.uniform(1e-3, 1e-2, m), jnp.float32)
    sw = jnp.asarray(rng.uniform(1e-3, 1e-2, n), jnp.float32)
    return xq, sx, wq, sw


@pytest.mark.parametrize("m,k,n,tiles", CASES, ids=str)
def test_lowers_for_cuda(m, k, n, tiles):
    args = [jax.ShapeDtypeStruct(s, d) for s, d in (((m, k), jnp.int8), ((m,), jnp.float32), ((n, k), jnp.int8),
                                                     ((n,), jnp.float32))]
    f = jax.jit(lambda *a: w8a8_matmul_mgpu(*a, tiles=tiles, num_sms=132))
    module = jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in module and "wgmma.mma_async" in module and ".s32.s8.s8" in module


def test_rejects_what_it_does_not_take():
    xq, sx, wq, sw = operands(128, 256, 256)
    with pytest.raises(ValueError, match="int8"):
        w8a8_matmul_mgpu(xq.astype(jnp.int32), sx, wq, sw)
    with pytest.raises(ValueError, match="N % 256"):
        w8a8_matmul_mgpu(xq, sx, wq[:192], sw[:192])
    with pytest.raises(ValueError, match="float32"):
        w8a8_matmul_mgpu(xq, sx[:64], wq, sw)
    with pytest.raises(ValueError, match="tile_k 128"):
        w8a8_matmul_mgpu(xq, sx, wq, sw, tiles=W8A8Tiles(tile_k=64))


def test_dispatch_falls_back_to_the_dot_tiles_where_wgmma_cannot_run():
    """kernel="mgpu" in interpret mode (no wgmma interpreter) runs the Triton dot tiles: the same numbers."""
    w = jax.random.normal(jax.random.key(0), (256, 512), jnp.float32)
    x = jax.random.normal(jax.random.key(1), (100, 256), jnp.bfloat16)
    qw = quantize_w8a8(w)
    cfg = TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=3)
    y = quantized_matmul(x, qw, config=cfg, interpret=True, _poison=True)
    ref = quantized_matmul_reference(x, qw)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,tiles", CASES, ids=str)
def test_matches_reference_on_gpu(m, k, n, tiles):
    args = operands(m, k, n, seed=m + n)
    y = np.asarray(w8a8_matmul_mgpu(*args, tiles=tiles), np.float32)
    ref = np.asarray(w8a8_matmul_reference(*args), np.float32)
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.gpu
def test_quantized_matmul_runs_it_where_the_config_says_mgpu():
    """Through the dispatch: activation quantization, M padded to the tile, scales, against the reference."""
    w = jax.random.normal(jax.random.key(2), (4096, 4608), jnp.float32)
    x = jax.random.normal(jax.random.key(3), (300, 4096), jnp.bfloat16)
    qw = quantize_w8a8(w)
    y = quantized_matmul(x, qw, config=TileConfig(kernel="mgpu", block_m=128, block_n=128, num_stages=3))
    ref = quantized_matmul_reference(x, qw)
    err = np.abs(np.asarray(y, np.float32) - np.asarray(ref, np.float32)).max()
    assert err <= 2e-2 * np.abs(np.asarray(ref, np.float32)).max()
