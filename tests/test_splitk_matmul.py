"""The split-K matmul (``kernels_pallas.splitk_matmul``) against its reference, the norm kernel taking its partial
sums, and a GLM whose o_proj / down_proj hand partial sums to the next norm against the same model on XLA's path:
fresh random inputs, NaN-poisoned outputs, uneven splits."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas import splitk_matmul as skm
from kernels_pallas.add_rms_norm import add_rms_norm, add_rms_norm_reference
from kernels_pallas.splitk_matmul import SplitKBlocks, splitk_matmul, splitk_matmul_reference

EPS = 1.5625e-07


def make(m, k, n, dtype, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    return x, w


class SplitKCases:
    interpret = True

    # (M, K, N, block_n, block_k, split_k): even and uneven splits (7 steps over 3), one split, 16-128 rows
    @pytest.mark.parametrize("m,k,n,bn,bk,s,dtype", [
        (32, 512, 256, 64, 128, 2, jnp.bfloat16), (16, 448, 128, 32, 64, 3, jnp.bfloat16),
        (64, 256, 192, 64, 64, 1, jnp.float16), (128, 1024, 64, 32, 128, 8, jnp.bfloat16),
        (32, 13 * 64, 96, 32, 64, 4, jnp.float32)])
    def test_matches_reference(self, m, k, n, bn, bk, s, dtype):
        x, w = make(m, k, n, dtype, m + k + n)
        poison = jnp.full((s, m, n), jnp.nan, jnp.float32)
        got = splitk_matmul(x, w, poison, block_n=bn, block_k=bk, split_k=s, interpret=self.interpret)
        want = splitk_matmul_reference(x, w, split_k=s, block_k=bk)
        assert got.shape == (s, m, n) and got.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(got))), "poisoned output not overwritten everywhere"
        scale = float(jnp.abs(want).max())
        # each split's partials as the reference's (float32 accumulation; TF32-free on bf16/f16 tensor cores)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5 * scale * np.sqrt(k / 64))
        full = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
        np.testing.assert_allclose(np.asarray(got).sum(0), full, atol=1e-4 * scale * np.sqrt(k / 64))
        if s > 1:  # the splits really are parts: none of them alone is the product
            assert np.abs(np.asarray(got[0]) - full).max() > 1e-2 * scale

    def test_bad_inputs_are_named(self):
        x, w = make(32, 256, 128, jnp.bfloat16, 1)
        with pytest.raises(ValueError, match="M in"):
            splitk_matmul(x[:24], w, interpret=self.interpret)
        with pytest.raises(ValueError, match="same K"):
            splitk_matmul(x, w[:128], interpret=self.interpret)
        with pytest.raises(ValueError, match="one float dtype"):
            splitk_matmul(x, w.astype(jnp.float32), interpret=self.interpret)
        with pytest.raises(ValueError, match="multiple of block_k"):
            splitk_matmul(x, w, block_k=512, interpret=self.interpret)
        with pytest.raises(ValueError, match="split_k must be"):
            splitk_matmul(x, w, block_k=128, split_k=3, interpret=self.interpret)
        with pytest.raises(ValueError, match="block_n must be"):
            splitk_matmul(x, w, block_n=48, interpret=self.interpret)

    def test_gradients_equal_the_references(self):
        x, w = make(16, 384, 64, jnp.float32, 3)
        ct = jax.random.normal(jax.random.key(4), (3, 16, 64), jnp.float32)
        loss = lambda f: (lambda a, b: jnp.sum(f(a, b) * ct))
        kernel = lambda a, b: splitk_matmul(a, b, block_n=32, block_k=64, split_k=3, interpret=self.interpret)
        ref = lambda a, b: splitk_matmul_reference(a, b, split_k=3, block_k=64)
        for g, r in zip(jax.grad(loss(kernel), (0, 1))(x, w), jax.grad(loss(ref), (0, 1))(x, w)):
            assert float(jnp.abs(r).max()) > 0
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5 * float(jnp.abs(r).max()))

    @pytest.mark.parametrize("s", [1, 2, 3])
    def test_norm_kernel_sums_the_partials(self, s):
        """add_rms_norm on [S, R, D] partials: the sum rounded to the residual's dtype once, then the add + norm."""
        x, w = make(32, 64 * s, 320, jnp.bfloat16, s)
        parts = splitk_matmul(x, w, block_n=64, block_k=64, split_k=s, interpret=self.interpret)
        res = jax.random.normal(jax.random.key(7), (32, 320), jnp.float32).astype(jnp.bfloat16)
        scale = (1 + 0.1 * jax.random.normal(jax.random.key(8), (320,), jnp.float32)).astype(jnp.bfloat16)
        y, new = add_rms_norm(parts, res, scale, eps=EPS, interpret=self.interpret)
        ry, rnew = add_rms_norm_reference(parts, res, scale, eps=EPS)
        np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(rnew, np.float32))
        want_new = (parts.sum(0).astype(jnp.bfloat16) + res).astype(jnp.bfloat16)  # the summed matmul, then the add
        np.testing.assert_array_equal(np.asarray(rnew, np.float32), np.asarray(want_new, np.float32))
        err = np.abs(np.asarray(y, np.float32) - np.asarray(ry, np.float32))
        assert np.all(err <= 2.0 ** -7 * np.abs(np.asarray(ry, np.float32)) + 1e-6), err.max()
        with pytest.raises(ValueError, match="partial sums"):
            add_rms_norm(parts.astype(jnp.bfloat16), res, scale, eps=EPS, interpret=self.interpret)


class TestSplitKInterpret(SplitKCases):
    interpret = True


@pytest.mark.gpu
class TestSplitKGPU(SplitKCases):
    interpret = False


def test_tuned_table_entries_are_valid():
    """Every tuned entry is "xla" or block sizes the kernel accepts for its own (M, K, N); lookup finds them, and
    an M the kernel does not take finds nothing."""
    with open(skm.TABLE_PATH) as f:
        entries = json.load(f)["entries"]
    assert entries
    for e in entries:
        found = skm.tuned_blocks(e["device"], e["m"], e["k"], e["n"])
        if e["config"] == "xla":
            assert found is None
            continue
        assert found == SplitKBlocks(**e["config"])
        x = jax.ShapeDtypeStruct((e["m"], e["k"]), jnp.bfloat16)
        w = jax.ShapeDtypeStruct((e["k"], e["n"]), jnp.bfloat16)
        skm.check_inputs(x, w, **dataclasses.asdict(found))
        assert skm.tuned_blocks(e["device"], 24, e["k"], e["n"]) is None


def _set(model, norm: str, splitk, glu="xla"):
    from flax import nnx

    from autoglm_jax.model.linear import Linear
    from autoglm_jax.model.mlp import MLP
    from autoglm_jax.model.norm import RMSNorm
    for _, m in nnx.iter_modules(model):
        if isinstance(m, RMSNorm):
            m.fused_kernel = norm
        if isinstance(m, Linear):
            m.splitk = splitk
        if isinstance(m, MLP):
            m.glu_kernel = glu


@pytest.mark.parametrize("norm", ["pallas", "xla"])
def test_model_with_partial_sums_equals_xla_path(monkeypatch, norm):
    """A tiny glm (no post-norms) whose gate/up projection runs glu_matmul and whose o_proj and down_proj return
    split-K partials (interpret mode on CPU) into the norm kernel ("pallas") or XLA's sum ("xla"): logits and cached
    greedy tokens equal the all-XLA path's, and the kernels ran at all three sites of every layer."""
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.model import linear as linear_module
    from autoglm_jax.model import mlp as mlp_module
    from autoglm_jax.model.glm import GLMForCausalLM
    from kernels_pallas.glu_matmul import GluBlocks, glu_matmul

    calls, glu_calls = [], []
    monkeypatch.setattr(linear_module, "splitk_matmul", lambda *a, **kw: calls.append(1) or splitk_matmul(*a, **kw))
    monkeypatch.setattr(mlp_module, "glu_matmul", lambda *a, **kw: glu_calls.append(1) or glu_matmul(*a, **kw))
    cfg = GLMConfig.from_preset("tiny", num_layers=3, post_norms=False, intermediate_size=768)
    model = GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(5))
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)  # M = 16 rows
    _set(model, "xla", "xla")
    want = model(ids)
    blocks, glu = SplitKBlocks(block_n=32, block_k=32, split_k=2), GluBlocks(block_n=32, block_k=32)
    _set(model, norm, blocks, glu)
    got = model(ids)
    assert len(calls) == 2 * cfg.num_layers and len(glu_calls) == cfg.num_layers
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    gen = GenerationConfig(max_new_tokens=4, eos_token_ids=())
    prompts = [[int(t) for t in row] for row in np.asarray(ids)] * 8  # 16 rows: each one-token step has M = 16
    toks = {}
    for path in ("xla", "splitk"):
        _set(model, *(("xla", "xla", "xla") if path == "xla" else (norm, blocks, glu)))
        toks[path] = np.stack([np.asarray(t) for t in decode_stream(model, prompts, gen)])
    np.testing.assert_array_equal(toks["splitk"], toks["xla"])
    _set(model, norm, "always")
    with pytest.raises(ValueError, match="splitk="):
        model(ids)
    _set(model, norm, "xla", "always")
    with pytest.raises(ValueError, match="glu_kernel="):
        model(ids)


@pytest.mark.gpu
def test_bf16_decode_on_gpu_with_partials_matches_xla(monkeypatch):
    """On the GPU in bfloat16 with the split-K kernel forced at o_proj / down_proj and glu_matmul at gate/up
    ("auto" norms): 32-row decode logits match the all-XLA path within bf16 rounding."""
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.loading import random_model

    cfg = GLMConfig.from_preset("tiny", num_layers=3, num_heads=32, num_kv_heads=2, head_dim=128, hidden_size=512,
                                vocab_size=512, intermediate_size=1024)
    model = random_model(cfg, dtype="bfloat16", seed=1)
    ids = jax.random.randint(jax.random.key(2), (32, 9), 0, cfg.vocab_size)
    logits = {}
    from kernels_pallas.glu_matmul import GluBlocks

    for path, blocks, glu in (("auto", SplitKBlocks(block_n=64, block_k=128, split_k=2), GluBlocks()),
                              ("xla", "xla", "xla")):
        _set(model, path, blocks, glu)
        cache = DenseKVCache.create(cfg, 32, 64, jnp.bfloat16, decode_kernel=path)
        pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (32, 8))
        out, cache = jax.jit(lambda m, i, p, c: m(i, p, cache=c))(model, ids[:, :8], pos, cache)
        out2, cache = jax.jit(lambda m, i, p, c: m(i, p, cache=c))(model, ids[:, 8:9], jnp.full((32, 1), 8, jnp.int32),
                                                                   cache)
        logits[path] = np.stack([np.asarray(out[:, -1], np.float32), np.asarray(out2[:, 0], np.float32)])
    scale = np.abs(logits["xla"]).max()
    assert np.abs(logits["auto"] - logits["xla"]).max() <= 0.03 * scale, np.abs(logits["auto"] - logits["xla"]).max()
