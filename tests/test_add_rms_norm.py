"""The fused residual add + RMSNorm kernel (``kernels_pallas.add_rms_norm``) against its reference, and a GLM whose
norms take it against the same model on XLA's path: fresh random inputs, ragged rows (rows past R masked) and D
not a power of two (columns masked), NaN-free outputs checked written everywhere."""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.add_rms_norm import add_rms_norm, add_rms_norm_reference

EPS = 1.5625e-07


def make(r, d, dtype, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    x = (2.0 * jax.random.normal(ks[0], (r, d), jnp.float32)).astype(dtype)
    res = (3.0 * jax.random.normal(ks[1], (r, d), jnp.float32) + 0.5).astype(dtype)
    w = (1.0 + 0.2 * jax.random.normal(ks[2], (d,), jnp.float32)).astype(dtype)
    return x, res, w


class AddRMSNormCases:
    interpret = True

    @pytest.mark.parametrize("r,d,block_r,warps,dtype", [(1, 4096, 1, 4, jnp.bfloat16), (32, 4096, 1, 8, jnp.bfloat16),
                                                         (5, 300, 2, 4, jnp.bfloat16), (7, 96, 4, 1, jnp.float16),
                                                         (3, 256, 2, 2, jnp.float32)])
    def test_matches_reference(self, r, d, block_r, warps, dtype):
        x, res, w = make(r, d, dtype, r * d)
        y, s = add_rms_norm(x, res, w, eps=EPS, block_r=block_r, num_warps=warps, interpret=self.interpret)
        ry, rs = add_rms_norm_reference(x, res, w, eps=EPS)
        assert y.shape == s.shape == (r, d) and y.dtype == s.dtype == dtype
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(rs, np.float32))  # one rounded add
        # the GPU's rsqrt may differ from XLA's in the last float32 bit: y within one rounding of the reference
        tol = 2.0 ** -7 if dtype == jnp.bfloat16 else (2.0 ** -10 if dtype == jnp.float16 else 1e-6)
        err = np.abs(np.asarray(y, np.float32) - np.asarray(ry, np.float32))
        assert np.all(err <= tol * np.abs(np.asarray(ry, np.float32)) + 1e-6), err.max()
        assert not np.array_equal(np.asarray(s, np.float32), np.asarray(x, np.float32))

    def test_bad_inputs_are_named(self):
        x, res, w = make(2, 64, jnp.bfloat16, 1)
        with pytest.raises(ValueError, match="one shape and dtype"):
            add_rms_norm(x, res[:1], w, eps=EPS, interpret=self.interpret)
        with pytest.raises(ValueError, match="scale must be"):
            add_rms_norm(x, res, w[:32], eps=EPS, interpret=self.interpret)
        with pytest.raises(ValueError, match="block_r must be"):
            add_rms_norm(x, res, w, eps=EPS, block_r=3, interpret=self.interpret)


    def test_gradients_equal_the_references(self):
        """Reverse mode through the kernel (bfloat16 training on a GPU takes this path) gives the reference's
        gradients for x, residual and scale."""
        x, res, w = make(3, 256, jnp.float32, 9)
        ct = jax.random.normal(jax.random.key(4), (2, 3, 256), jnp.float32)
        loss = lambda f: (lambda a, b, c: sum(jnp.sum(o * t) for o, t in zip(f(a, b, c), ct)))
        kernel = lambda a, b, c: add_rms_norm(a, b, c, eps=EPS, interpret=self.interpret)
        ref = lambda a, b, c: add_rms_norm_reference(a, b, c, eps=EPS)
        got = jax.grad(loss(kernel), argnums=(0, 1, 2))(x, res, w)
        want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, res, w)
        for g, r in zip(got, want):
            assert float(jnp.abs(r).max()) > 0
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)


class TestAddRMSNormInterpret(AddRMSNormCases):
    interpret = True


@pytest.mark.gpu
class TestAddRMSNormGPU(AddRMSNormCases):
    interpret = False


def _set_norm_kernel(model, value):
    from flax import nnx

    from autoglm_jax.model.norm import RMSNorm
    for _, m in nnx.iter_modules(model):
        if isinstance(m, RMSNorm):
            m.fused_kernel = value


def test_model_with_fused_norms_equals_xla_path(monkeypatch):
    """A tiny glm4 (post-norms too) with every norm on the kernel (interpret mode on CPU): logits and cached greedy
    tokens equal the XLA path's, and the kernel ran at every add + norm site."""
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.model import norm as norm_module
    from autoglm_jax.model.glm import GLMForCausalLM

    calls = []
    monkeypatch.setattr(norm_module, "add_rms_norm", lambda *a, **kw: calls.append(1) or add_rms_norm(*a, **kw))
    cfg = GLMConfig.from_preset("tiny", num_layers=3, post_norms=True)
    model = GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(5))
    ids = jnp.asarray([[5, 9, 11, 2, 7, 3], [3, 4, 8, 1, 0, 6]], jnp.int32)
    _set_norm_kernel(model, "xla")
    want = model(ids)
    _set_norm_kernel(model, "pallas")
    got = model(ids)
    assert len(calls) == 2 * cfg.num_layers  # layer 0's input norm has nothing to add; the final norm does
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    gen = GenerationConfig(max_new_tokens=5, eos_token_ids=())
    toks = {}
    for kernel in ("xla", "pallas"):
        _set_norm_kernel(model, kernel)
        toks[kernel] = np.stack([np.asarray(t) for t in decode_stream(model, [[5, 9, 11], [3, 4]], gen)])
    np.testing.assert_array_equal(toks["pallas"], toks["xla"])
    _set_norm_kernel(model, "fused")
    with pytest.raises(ValueError, match="fused_kernel="):
        model(ids)


@pytest.mark.gpu
def test_bf16_decode_on_gpu_fused_paths_match_xla():
    """On the GPU in bfloat16 (where "auto" takes the fused norm and the rows decode kernel): the logits of a prompt
    and of cached one-token steps match the all-XLA path (norms "xla", decode_kernel "xla") within bf16 rounding."""
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.loading import random_model

    cfg = GLMConfig.from_preset("tiny", num_layers=3, num_heads=32, num_kv_heads=2, head_dim=128, hidden_size=512,
                                vocab_size=512)
    model = random_model(cfg, dtype="bfloat16", seed=1)
    ids = jax.random.randint(jax.random.key(2), (4, 9), 0, cfg.vocab_size)
    logits = {}
    for path in ("auto", "xla"):
        _set_norm_kernel(model, path)
        cache = DenseKVCache.create(cfg, 4, 64, jnp.bfloat16, decode_kernel=path)
        pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (4, 8))
        out, cache = jax.jit(lambda m, i, p, c: m(i, p, cache=c))(model, ids[:, :8], pos, cache)
        steps = [out[:, -1]]
        for t in range(8, 9):  # cached one-token steps
            out, cache = jax.jit(lambda m, i, p, c: m(i, p, cache=c))(model, ids[:, t:t + 1],
                                                                        jnp.full((4, 1), t, jnp.int32), cache)
            steps.append(out[:, 0])
        logits[path] = np.stack([np.asarray(s, np.float32) for s in steps])
    scale = np.abs(logits["xla"]).max()
    assert np.abs(logits["auto"] - logits["xla"]).max() <= 0.03 * scale, np.abs(logits["auto"] - logits["xla"]).max()
