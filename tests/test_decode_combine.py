"""decode_combine: the split-K combine of decode attention's partial outputs, with o_proj's digit planes.

Fresh random partials with an empty split (lse = -1e30) and unequal log-sum-exps; the Pallas combine against the
XLA one (``combine_reference``), and its planes against ``digit_planes_pallas`` of its own output."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.decode_combine import combine_planes, combine_reference
from kernels_pallas.qmatmul_dp4a import digit_planes_pallas


# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_matches_reference_and_writes_planes[2-5-16-128]',
}


def partials(seed, kh=2, splits=5, rows=16, h=128):
    ko, kl = jax.random.split(jax.random.key(seed))
    o = jax.random.normal(ko, (1, kh, splits, rows, h), jnp.float32)
    lse = 3.0 * jax.random.normal(kl, (1, kh, splits, rows), jnp.float32)
    return o, lse.at[:, :, 1].set(-1e30)  # split 1 empty: weighs nothing


class CombineCases:
    interpret = True

    @pytest.mark.parametrize("kh,splits,rows,h", [(2, 5, 16, 128), (4, 1, 16, 64), (1, 33, 32, 128)])
    def test_matches_reference_and_writes_planes(self, kh, splits, rows, h):
        o, lse = partials(kh + splits + rows, kh, splits, rows, h)
        out, dg = jax.jit(lambda o, l: combine_planes(o, l, dtype=jnp.bfloat16, interpret=self.interpret))(o, lse)
        ref = combine_reference(o, lse).reshape(1, kh * rows, h)
        assert out.shape == (1, kh * rows, h) and out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=2 ** -7, atol=1e-6)
        want = digit_planes_pallas(out.reshape(1, -1), h, interpret=self.interpret)
        assert dg.group == h and dg.digits.shape == (4, kh * rows, h // 2)
        for got, w in zip((dg.digits, dg.group_sums, dg.step), want):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(w))

    def test_bad_shapes_are_named(self):
        o, lse = partials(1)
        with pytest.raises(ValueError, match="one row's partials"):
            combine_planes(jnp.concatenate([o, o]), jnp.concatenate([lse, lse]), dtype=jnp.bfloat16,
                           interpret=True)
        with pytest.raises(ValueError, match="one row's partials"):
            combine_planes(o[:, :, :, :12], lse[:, :, :, :12], dtype=jnp.bfloat16, interpret=True)


class TestCombineInterpret(CombineCases):
    interpret = True


@pytest.mark.gpu
class TestCombineGPU(CombineCases):
    interpret = False
