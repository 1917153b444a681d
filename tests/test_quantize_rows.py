"""The one-pass activation kernels (``kernels_pallas.quantize_rows``: W8A8's ``quantize_rows``, the xla_split path's
``split_rows``) against their references (``quant_formats.quantize_activations``, ``split_digits``) and numpy's IEEE
quotients: fresh random inputs with an all-zero row, ragged M (rows past M masked) and K not a power of two
(columns masked), NaN-poisoned outputs checked written."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.qmatmul_tiles import TileConfig
from kernels_pallas.quant_formats import QuantFormatError, quantize_activations
from kernels_pallas.quantize_rows import quantize_rows, round_quotient, round_to_int


class QuantizeRowsCases:
    interpret = True

    def check_quotients(self, q, x, step, bound, ref, frac=1e-3):
        """``q = clip(round(x / step))`` with the quotient correctly rounded: against numpy's IEEE float32 division by
        the kernel's own step, exactly on the GPU (``round_quotient``; interpret mode divides with XLA, which may
        multiply by a reciprocal: one step off on a few elements); against XLA's reference ``ref`` at most one step
        apart on < ``frac`` of the elements (quotients near 16256 carry float32 rounding of ~2**-10 a step: 1e-2)."""
        want = np.clip(np.round(np.asarray(x, np.float32) / step.astype(np.float32)), -bound, bound)
        d = np.abs(q.astype(np.int64) - want.astype(np.int64))
        if not self.interpret:
            assert d.max() == 0, (d.max(), (d > 0).mean())
        assert d.max() <= 1 and (d > 0).mean() < frac, (d.max(), (d > 0).mean())
        d = np.abs(q.astype(np.int64) - ref.astype(np.int64))
        assert d.max() <= 1 and (d > 0).mean() < frac, (d.max(), (d > 0).mean())

    @pytest.mark.parametrize("m,k,block_m,block_k,warps", [(5, 13696, 1, 2048, 8), (7, 4096, 2, 1024, 4),
                                                           (3, 300, 4, 64, 1), (9, 1000, 8, 2048, 2)])
    def test_matches_reference(self, m, k, block_m, block_k, warps):
        x = (3.0 * jax.random.normal(jax.random.key(m * k), (m, k), jnp.float32)).astype(jnp.bfloat16)
        x = x.at[1].set(0).at[0, 7].set(-250.0)  # an all-zero row; a row whose absmax is one negative element
        q, s = quantize_rows(x, block_m=block_m, block_k=block_k, num_warps=warps, interpret=self.interpret)
        rq, rs = quantize_activations(x)
        assert q.shape == (m, k) and q.dtype == jnp.int8 and s.shape == (m, 1) and s.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s), np.asarray(rs), rtol=1e-6)
        self.check_quotients(np.asarray(q), x, np.asarray(s), 127, np.asarray(rq))
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
        # the reference quantizes x with XLA, which on the GPU may round a few quotients a step the other way (see
        # check_quotients): allow two such steps a row (each moves a row's outputs by at most sx * max|w|)
        sx = np.abs(np.asarray(x, np.float32)).max(axis=1, keepdims=True) / 127
        atol = 2 * sx * np.abs(np.asarray(w.dequantize(), np.float32)).max() + 1e-5
        assert np.all(np.abs(np.asarray(y) - np.asarray(ref)) <= atol)


    @pytest.mark.parametrize("m,k,block_k,warps", [(1, 13696, 16384, 16), (3, 4096, 1024, 4), (5, 300, 64, 1)])
    def test_split_rows_matches_split_digits(self, m, k, block_k, warps):
        """The xla_split path's one-launch digits against XLA's ``split_digits``: steps alike, the digits' value
        128 hi + lo the correctly rounded quotient (``check_quotients``), digits in range, within half a step of x."""
        from kernels_pallas.quantize_rows import split_rows
        from kernels_pallas.quantized_matmul import SPLIT_STEPS, split_digits
        x = (3.0 * jax.random.normal(jax.random.key(m + k), (m, k), jnp.float32)).astype(jnp.bfloat16)
        x = x.at[0, 5].set(-300.0)
        step, d = split_rows(x, steps=SPLIT_STEPS, block_k=block_k, num_warps=warps, interpret=self.interpret)
        rstep, rd = split_digits(x.astype(jnp.float32), axis=1)
        assert step.shape == (m, 1) and d.shape == (2 * m, k) and d.dtype == jnp.int8
        np.testing.assert_allclose(np.asarray(step), np.asarray(rstep), rtol=1e-6)
        xs = 128 * np.asarray(d[:m], np.int32) + np.asarray(d[m:], np.int32)
        d, rd = np.asarray(d, np.int64), np.asarray(rd, np.int64)
        self.check_quotients(128 * d[:m] + d[m:], x, np.asarray(step), SPLIT_STEPS, 128 * rd[:m] + rd[m:], 1e-2)
        assert np.abs(np.asarray(d[:m], np.int32)).max() <= 127 and np.abs(np.asarray(d[m:], np.int32)).max() <= 64
        assert int(xs[0, 5]) == -SPLIT_STEPS
        assert np.all(np.abs(xs * np.asarray(step) - np.asarray(x, np.float32)) <= np.asarray(step) * 0.5 * 1.001)

    def test_xla_split_with_kernel_digits_matches_xla_digits(self):
        # int8_split_matmul(prep="kernel"), what the GPU dispatch runs where the table says xla_split
        from kernels_pallas.quant_formats import quantize
        from kernels_pallas.quantized_matmul import int8_split_matmul
        x = jax.random.normal(jax.random.key(8), (4, 512), jnp.float32).astype(jnp.bfloat16)
        q = quantize(0.05 * jax.random.normal(jax.random.key(9), (512, 136), jnp.float32), "int8")
        a = int8_split_matmul(x, q, prep="kernel", interpret=self.interpret)
        b = int8_split_matmul(x, q, prep="xla")
        if self.interpret:  # the same digits, the same int8 dot (on the GPU XLA's digits may be a step off)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        step = np.abs(np.asarray(x, np.float64)).max(axis=1, keepdims=True) / (127 * 128)
        bound = step * np.abs(np.asarray(q.dequantize(), np.float64)).sum(axis=0) * 1.01  # a step each side at most
        assert np.all(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) <= bound)
        with pytest.raises(QuantFormatError, match="prep must be 'xla' or 'kernel'"):
            int8_split_matmul(x, q, prep="numpy")


class TestQuantizeRowsInterpret(QuantizeRowsCases):
    interpret = True


@pytest.mark.gpu
class TestQuantizeRowsGPU(QuantizeRowsCases):
    interpret = False


def test_interpret_rounding_is_half_to_even():
    # the interpret-mode forms of the kernels' PTX rounding helpers (the GPU forms are checked bit for bit against
    # numpy's IEEE quotients by check_quotients)
    v = jnp.asarray([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -3.51, 126.5, 127.5, 0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(round_to_int(v, True)), [-2, -2, 0, 0, 2, 2, 3, -4, 126, 128, 0])
    np.testing.assert_array_equal(np.asarray(round_quotient(v, jnp.float32(0.5), jnp.float32(2.0), True)),
                                  [-5, -3, -1, 1, 3, 5, 7, -7, 253, 255, 0])


def test_bad_input_raises_before_launch():
    with pytest.raises(QuantFormatError, match=r"float \[M, K\]"):
        quantize_rows(jnp.ones((4,), jnp.float32), interpret=True)
    with pytest.raises(QuantFormatError, match=r"float \[M, K\]"):
        quantize_rows(jnp.ones((2, 4), jnp.int32), interpret=True)
    with pytest.raises(QuantFormatError, match="block_m must be a power of two"):
        quantize_rows(jnp.ones((2, 4), jnp.float32), block_m=3, interpret=True)
    with pytest.raises(QuantFormatError, match="block_k a power of two >= 16"):
        quantize_rows(jnp.ones((2, 4), jnp.float32), block_k=100, interpret=True)
