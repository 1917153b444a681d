"""The gate/up projection with SwiGLU in its epilogue (``kernels_pallas.glu_matmul``) against its reference:
fresh random inputs, NaN-poisoned outputs, several shapes; gradients through the reference's VJP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas import glu_matmul as glu
from kernels_pallas.glu_matmul import GluBlocks, glu_matmul, glu_matmul_reference


def make(m, k, f, dtype, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (2.0 * jax.random.normal(kw, (k, 2 * f), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w


def exact(x, w):
    """float64 up * silu(gate) of the float64 product: what every path approximates."""
    gu = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    g, u = np.split(gu, 2, axis=-1)
    return u * g / (1.0 + np.exp(-g))


class GluCases:
    interpret = True

    @pytest.mark.parametrize("m,k,f,bn,bk,dtype", [(32, 512, 192, 64, 128, jnp.bfloat16),
                                                   (16, 256, 96, 32, 64, jnp.float16),
                                                   (64, 384, 128, 64, 128, jnp.bfloat16),
                                                   (128, 128, 64, 16, 32, jnp.float32)])
    def test_matches_reference(self, m, k, f, bn, bk, dtype):
        x, w = make(m, k, f, dtype, m + k + f)
        out = jnp.full((m, f), jnp.nan, dtype)
        got = glu_matmul(x, w, out, block_n=bn, block_k=bk, interpret=self.interpret)
        ref = glu_matmul_reference(x, w)
        assert got.shape == (m, f) and got.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(got))), "poisoned output not overwritten everywhere"
        want = exact(x, w)
        # gate and up rounded to the dtype once, SwiGLU rounded once: within two roundings of the exact value,
        # as the reference (which rounds at every op) is
        # float32: the sum over K dominates
        ulp = {jnp.bfloat16: 2.0 ** -8, jnp.float16: 2.0 ** -11, jnp.float32: 2.0 ** -16}[dtype]
        bound = 4 * ulp * (np.abs(want) + np.abs(np.split(np.asarray(x, np.float64) @ np.asarray(w, np.float64), 2,
                                                            axis=-1)[1])) + 2 * ulp * np.abs(want).max()
        for name, y in (("kernel", got), ("reference", ref)):
            err = np.abs(np.asarray(y, np.float64) - want)
            assert np.all(err <= bound), (name, float((err - bound).max()))
        assert float(np.abs(want).max()) > 0.5

    def test_bad_inputs_are_named(self):
        x, w = make(32, 256, 64, jnp.bfloat16, 1)
        with pytest.raises(ValueError, match="M in"):
            glu_matmul(x[:20], w, interpret=self.interpret)
        with pytest.raises(ValueError, match="same K"):
            glu_matmul(x, w[:128], interpret=self.interpret)
        with pytest.raises(ValueError, match="same K"):
            glu_matmul(x, w[:, :127], interpret=self.interpret)
        with pytest.raises(ValueError, match="of block_n"):
            glu_matmul(x, w, block_n=128, interpret=self.interpret)
        with pytest.raises(ValueError, match="one float dtype"):
            glu_matmul(x, w.astype(jnp.float32), interpret=self.interpret)

    def test_gradients_equal_the_references(self):
        x, w = make(16, 128, 64, jnp.float32, 3)
        ct = jax.random.normal(jax.random.key(4), (16, 64), jnp.float32)
        loss = lambda f: (lambda a, b: jnp.sum(f(a, b) * ct))
        kernel = lambda a, b: glu_matmul(a, b, block_n=32, block_k=32, interpret=self.interpret)
        for g, r in zip(jax.grad(loss(kernel), (0, 1))(x, w), jax.grad(loss(glu_matmul_reference), (0, 1))(x, w)):
            assert float(jnp.abs(r).max()) > 0
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


class TestGluInterpret(GluCases):
    interpret = True


@pytest.mark.gpu
class TestGluGPU(GluCases):
    interpret = False


def test_tuned_table_entries_are_valid():
    """Every tuned entry is "xla" or block sizes the kernel accepts for its own (M, K, 2F), found by the lookup."""
    with open(glu.TABLE_PATH) as f:
        entries = json.load(f)["entries"]
    assert entries
    for e in entries:
        found = glu.tuned_blocks(e["device"], e["m"], e["k"], e["n"])
        if e["config"] == "xla":
            assert found is None
            continue
        assert found == GluBlocks(**e["config"])
        glu.check_inputs(jax.ShapeDtypeStruct((e["m"], e["k"]), jnp.bfloat16),
                         jax.ShapeDtypeStruct((e["k"], e["n"]), jnp.bfloat16), block_n=found.block_n,
                         block_k=found.block_k, num_warps=found.num_warps, num_stages=found.num_stages)
