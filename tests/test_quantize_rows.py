"""W8A8's one-pass activation quantization kernel (``kernels_pallas.quantize_rows``) against its reference,
``quant_formats.quantize_activations``: fresh random inputs with an all-zero row, ragged M (rows past M masked)
and K not a power of two (columns masked), NaN-poisoned outputs checked written."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.qmatmul_tiles import TileConfig
from kernels_pallas.quant_formats import QuantFormatError, quantize_activations
from kernels_pallas.quantize_rows import quantize_rows, round_half_even


class QuantizeRowsCases:
    interpret = True

    @pytest.mark.parametrize("m,k,block_m,warps", [(5, 13696, 1, 8), (7, 4096, 2, 4), (3, 300, 4, 1),
                                                   (9, 1000, 8, 2)])
    def test_matches_reference(self, m, k, block_m, warps):
        x = (3.0 * jax.random.normal(jax.random.key(m * k), (m, k), jnp.float32)).astype(jnp.bfloat16)
        x = x.at[1].set(0).at[0, 7].set(-250.0)  # an all-zero row; a row whose absmax is one negative element
        q, s = quantize_rows(x, block_m=block_m, num_warps=warps, interpret=self.interpret)
        rq, rs = quantize_activations(x)
        assert q.shape == (m, k) and q.dtype == jnp.int8 and s.shape == (m, 1) and s.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-6)
        d = np.abs(np.asarray(q, np.int32) - np.asarray(rq, np.int32))
        assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())
        assert int(q[0, 7]) == -127 and not np.any(np.asarray(q[1])) and float(s[1, 0]) == 1.0
        assert np.all(np.abs(np.asarray(q, np.float32) * np.asarray(s) - np.asarray(x, np.float32))
                      <= np.asarray(s) * 0.5 * 1.001)

    def test_w8a8_matmul_uses_it_and_matches(self, monkeypatch):
        # quantized_matmul's GPU path quantizes x with this kernel; the product equals the reference's
        from kernels_pallas import quantize_rows as module
        from kernels_pallas.quant_formats import quantize_w8a8
        from kernels_pallas.quantized_matmul import quantized_matmul, quantized_matmul_reference
        calls = []
        monkeypatch.setattr(module, "quantize_rows", lambda *a, **kw: calls.append(1) or quantize_rows(*a, **kw))
        x = jax.random.normal(jax.random.key(3), (6, 256), jnp.float32).astype(jnp.bfloat16)
        w = quantize_w8a8(0.05 * jax.random.normal(jax.random.key(4), (256, 72), jnp.float32) + 0.01)
        cfg = TileConfig(kernel="dot", block_m=16, block_n=64, block_k=128)  # the Pallas dot, whatever the table says
        y = quantized_matmul(x, w, out_dtype=jnp.float32, impl="pallas_gpu", interpret=self.interpret, config=cfg,
                             _poison=True)
        assert calls, "the W8A8 GPU path did not quantize x with quantize_rows"
        ref = quantized_matmul_reference(x, w, out_dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


class TestQuantizeRowsInterpret(QuantizeRowsCases):
    interpret = True


@pytest.mark.gpu
class TestQuantizeRowsGPU(QuantizeRowsCases):
    interpret = False


def test_round_half_even_is_jnp_round():
    v = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -3.51, 126.5, 127.5, 0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(round_half_even(v)), np.asarray(jnp.round(v)))


def test_bad_input_raises_before_launch():
    with pytest.raises(QuantFormatError, match=r"float \[M, K\]"):
        quantize_rows(jnp.ones((4,), jnp.float32), interpret=True)
    with pytest.raises(QuantFormatError, match=r"float \[M, K\]"):
        quantize_rows(jnp.ones((2, 4), jnp.int32), interpret=True)
    with pytest.raises(QuantFormatError, match="block_m must be a power of two"):
        quantize_rows(jnp.ones((2, 4), jnp.float32), block_m=3, interpret=True)
