"""The one-row integer-dot GEMV over a K-major ``Int8Weight`` (``qmatmul_dp4a.dp4a_gemv``, TileConfig
``kernel="dp4a"``): x as the int4 GEMV's digit planes with a step per 128 of K, four signed ``dp4a`` per four
weights of each half of a group.

Kernel cases run with a NaN-poisoned output, fresh random non-zero inputs, ragged N and K's groups not filling
the last step (masked); the only approximation is the activation's 15-bit fixed point, checked against the
``xla_split`` path's bound (a row step; the groups' steps are at most that)."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.act_digits import ActDigits
from kernels_pallas.qmatmul_dp4a import INT8_GROUP, digit_planes_pallas, dp4a_gemv, planes_group
from kernels_pallas.qmatmul_tiles import TileConfig
from kernels_pallas.quant_formats import QuantFormatError, quantize_int8
from kernels_pallas.quantized_matmul import digits_layout, fit_config, quantized_matmul, quantized_matmul_reference

from .qmatmul_fixtures import split_bound


# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_matches_reference[split]',
    'test_matches_reference[ragged]',
}


def problem(seed, k, n, m=1, k_major=True):
    kx, kw = jax.random.split(jax.random.key(seed))
    w = 0.05 * jax.random.normal(kw, (k, n), jnp.float32) + 0.01
    x = (2.0 * jax.random.normal(kx, (m, k), jnp.float32)).astype(jnp.bfloat16)
    return x, quantize_int8(w, k_major=k_major)


DP4A = lambda bn, bk, w=4, s=1: TileConfig(kernel="dp4a", block_m=1, block_n=bn, block_k=bk,  # noqa: E731
                                           split_k=s, num_warps=w, num_stages=1)
# (K, N, config)
CASES = [
    (512, 200, DP4A(4, 256)),  # 4 groups in 2 steps, ragged N (200 = 50 programs of 4)
    (640, 136, DP4A(8, 512, 2)),  # 5 groups in 4-group steps: the second step masked
    (384, 40, DP4A(1, 128)),  # one group a step, one row a program
    (1792, 72, DP4A(4, 256, 1, 3)),  # 7 steps of 2 groups in 3 splits of 3 (2 steps past K)
    (13696, 24, DP4A(2, 2048, 2, 4)),  # down_proj's K: 107 groups, 7 steps of 16, 4 splits of 2
]
IDS = ["ragged", "masked", "1row", "split", "down-107"]


class Int8Dp4aCases:
    interpret = True

    @pytest.mark.parametrize("k,n,cfg", CASES, ids=IDS)
    def test_matches_reference(self, k, n, cfg):
        x, q = problem(k + n, k, n)
        assert fit_config(cfg, q, 1).kernel == "dp4a"
        out = quantized_matmul(x, q, out_dtype=jnp.float32, impl="pallas_gpu", interpret=self.interpret, config=cfg,
                               _poison=True)
        ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
        assert out.shape == ref.shape and bool(jnp.isfinite(out).all()), "unwritten (NaN-poisoned) outputs"
        err = jnp.abs(out - ref)
        assert bool(jnp.all(err <= split_bound(x, q))), float(jnp.max(err - split_bound(x, q)))
        assert float(jnp.max(err)) > 0  # the fixed point, not a float path
        assert float(jnp.linalg.norm(err) / jnp.linalg.norm(ref)) < 1e-3

    def test_producer_digits_give_the_same_output(self):
        """Planes written before the call (as ``add_rms_norm`` / ``swiglu_digits`` write them) give the output of
        the GEMV's own prep, bit for bit, and ``digits_layout`` names that layout."""
        x, q = problem(3, 1024, 96)
        cfg = fit_config(DP4A(2, 512, 2), q, 1)
        assert digits_layout(x, q, impl="pallas_gpu", interpret=self.interpret, config=cfg) == INT8_GROUP
        planes, xg, step = digit_planes_pallas(x, INT8_GROUP, interpret=self.interpret)
        given = ActDigits(step=step, digits=planes, group_sums=xg, group=INT8_GROUP)
        kw = dict(out_dtype=jnp.bfloat16, impl="pallas_gpu", interpret=self.interpret, config=cfg)
        np.testing.assert_array_equal(np.asarray(quantized_matmul(x, q, x_digits=given, **kw), np.float32),
                                      np.asarray(quantized_matmul(x, q, **kw), np.float32))
        short = digit_planes_pallas(x[:, :512], INT8_GROUP, interpret=self.interpret)  # this layout, another K
        bad = ActDigits(step=short[2], digits=short[0], group_sums=short[1], group=INT8_GROUP)
        with pytest.raises(QuantFormatError, match="do not fit"):
            quantized_matmul(x, q, x_digits=bad, **kw)

    @pytest.mark.parametrize("split", [1, 3])
    def test_writes_its_output_dtype_with_one_split(self, split):
        x, q = problem(5, 1792, 72)
        cfg = fit_config(DP4A(4, 256, 4, split), q, 1)
        odt = jnp.bfloat16 if split == 1 else jnp.float32
        out = jnp.full((cfg.split_k, 72), jnp.nan, odt)
        y = dp4a_gemv(x, q, out, cfg=cfg, out_dtype=jnp.bfloat16, interpret=self.interpret)
        assert y.dtype == odt and y.shape == (1, 72) and bool(jnp.isfinite(y).all())


class TestInt8Dp4aInterpret(Int8Dp4aCases):
    interpret = True

    def test_dispatch_takes_dp4a_only_where_it_applies(self):
        x, q = problem(7, 512, 64)
        assert fit_config(DP4A(2, 256), q, 1).kernel == "dp4a"
        assert fit_config(DP4A(2, 256), q, 2).kernel == "dot"  # more than one row: the dot tiles
        _, kn = problem(7, 512, 64, k_major=False)
        assert fit_config(DP4A(2, 256), kn, 1).kernel == "gemv"  # [K, N]: the FMA GEMV
        _, odd = problem(7, 192, 64)  # K not a multiple of INT8_GROUP
        assert planes_group(odd) is None and fit_config(DP4A(2, 256), odd, 1).kernel == "gemv"
        assert digits_layout(x, q, impl="pallas_gpu", interpret=True, config=DP4A(1, 4096, 1, 1)) == INT8_GROUP
        x1, one = problem(7, 128, 64)  # one group: no tile fits (tile_fits) -> the FMA GEMV, still right
        assert fit_config(DP4A(2, 256), one, 1).kernel == "gemv"
        y = quantized_matmul(x1, one, impl="pallas_gpu", interpret=True, config=DP4A(2, 256), out_dtype=jnp.float32)
        ref = quantized_matmul_reference(x1, one, out_dtype=jnp.float32)
        assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 1e-3

    def test_a_given_config_serves_calls_with_producer_digits(self, monkeypatch):
        """A table entry's ``given_config`` (here the dp4a GEMV beside an FMA GEMV ``config``) is the path of calls
        whose x comes with its producer's digits in its layout, and ``digits_layout(..., given=True)`` names that
        layout; calls without digits, or with digits of another layout, take ``config``."""
        from kernels_pallas import qmatmul_tiles
        x, q = problem(13, 512, 96)
        gemv = TileConfig(kernel="gemv", block_m=1, block_n=1, block_k=512, num_stages=1)
        dp = DP4A(2, 256)
        entry = dict(device=qmatmul_tiles.device_key(jax.devices()[0].device_kind), format="int8_kmajor", m=1,
                     k=512, n=96, config=gemv.to_json(), given_config=dp.to_json())
        monkeypatch.setattr(qmatmul_tiles, "load_table", lambda *a: (entry,))
        kw = dict(impl="pallas_gpu", interpret=True, out_dtype=jnp.float32)
        assert digits_layout(x, q, impl="pallas_gpu", interpret=True) is None
        assert digits_layout(x, q, impl="pallas_gpu", interpret=True, given=True) == INT8_GROUP
        p, xg, step = digit_planes_pallas(x, INT8_GROUP, interpret=True)
        with_digits = np.asarray(quantized_matmul(x, q, x_digits=ActDigits(step, p, xg, INT8_GROUP), **kw))
        np.testing.assert_array_equal(with_digits, np.asarray(quantized_matmul(x, q, config=dp, **kw)))
        without = np.asarray(quantized_matmul(x, q, **kw))
        np.testing.assert_array_equal(without, np.asarray(quantized_matmul(x, q, config=gemv, **kw)))
        assert not np.array_equal(with_digits, without)  # the fixed point, not the float GEMV
        rows = ActDigits(step=jnp.ones((1, 1)), digits=jnp.zeros((2, 512), jnp.int8), group_sums=None, group=0)
        np.testing.assert_array_equal(np.asarray(quantized_matmul(x, q, x_digits=rows, **kw)), without)

    def test_bad_requests_are_named(self):
        x, q = problem(9, 512, 64)
        with pytest.raises(QuantFormatError, match="K-major Int8Weight with K a multiple of 128"):
            dp4a_gemv(x, problem(9, 512, 64, k_major=False)[1], cfg=DP4A(2, 256), interpret=True)
        with pytest.raises(QuantFormatError, match="one row"):
            dp4a_gemv(jnp.concatenate([x, x]), q, cfg=DP4A(2, 256), interpret=True)
        with pytest.raises(QuantFormatError, match="kernel in"):
            dp4a_gemv(x, q, cfg=TileConfig(kernel="gemv", block_m=1, block_n=2, block_k=256), interpret=True)
        with pytest.raises(ValueError, match="block_m=1"):
            TileConfig(kernel="dp4a", block_m=2)


@pytest.mark.gpu
class TestInt8Dp4aGPU(Int8Dp4aCases):
    interpret = False

    @pytest.mark.parametrize("k,n,bn,bk,w,s", [(4096, 27392, 2, 4096, 4, 1), (13696, 4096, 2, 2048, 2, 1),
                                                (13696, 4096, 4, 2048, 4, 4), (4096, 4608, 4, 1024, 2, 1)])
    def test_glm_shapes(self, k, n, bn, bk, w, s):
        x, q = problem(k + n, k, n)
        cfg = DP4A(bn, bk, w, s)
        out = quantized_matmul(x, q, out_dtype=jnp.float32, impl="pallas_gpu", config=cfg, _poison=True)
        ref = quantized_matmul_reference(x, q, out_dtype=jnp.float32)
        assert bool(jnp.isfinite(out).all()) and bool(jnp.all(jnp.abs(out - ref) <= split_bound(x, q)))
