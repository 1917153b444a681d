"""Fused dense decode attention (kernels_pallas/dense_decode_attention.py): kernel vs reference, and the
DenseKVCache decode path that uses it vs the XLA path.

Every kernel case runs with NaN-poisoned outputs (``_poison=True``) and NaN in every cache slot the query
must not see (slots past its position, including the slot being written), fresh random non-zero inputs,
several splits (some empty) and positions at 0, inside, at the last slot and past the cache (dropped).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.dense_decode_attention import dense_decode_attention, dense_decode_attention_reference

# (B, N, K, H, S, positions, splits, block_s)
CASES = [
    (3, 8, 2, 64, 128, (0, 77, 127), 1, 32),
    (3, 8, 2, 64, 128, (5, 64, 200), 3, 32),  # 200 >= S: the write is dropped, the query sees all 128 slots
    (2, 32, 2, 128, 256, (255, 17), 4, 64),  # GLM's 16 query heads per KV head
    (4, 6, 3, 32, 96, (95, 0, 50, 31), 2, 64),  # G=2 padded to 16 rows; block_s 64 -> 32 (divides S)
]
IDS = ["one-split", "dropped-write", "glm-group", "small-group"]


def make(case, seed):
    b, n, k, h, s, pos, _, _ = case
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, n, h), jnp.float32).astype(jnp.bfloat16)
    kn, vn = (jax.random.normal(kk, (b, k, h), jnp.float32).astype(jnp.bfloat16) for kk in ks[1:3])
    ck, cv = (jax.random.normal(kk, (b, k, s, h), jnp.float32).astype(jnp.bfloat16) for kk in ks[3:5])
    return q, kn, vn, ck, cv, jnp.asarray(pos, jnp.int32)


def poison_unseen(cache, positions):
    """NaN in every slot at or past each row's position (stale slots and the slot being written)."""
    slots = jnp.arange(cache.shape[2])[None, None, :, None]
    return jnp.where(slots >= positions[:, None, None, None], jnp.nan, cache)


class KernelCases:
    interpret = True

    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_matches_reference(self, case):
        q, kn, vn, ck, cv, pos = make(case, sum(case[:5]))
        scale = case[3] ** -0.5
        ref_out, ref_k, ref_v = dense_decode_attention_reference(q, kn, vn, ck, cv, pos, scale=scale)
        f = jax.jit(lambda *a: dense_decode_attention(*a, scale=scale, splits=case[6], block_s=case[7],
                                                      interpret=self.interpret, _poison=True))
        out, nk, nv = f(q, kn, vn, poison_unseen(ck, pos), poison_unseen(cv, pos), pos)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert bool(jnp.isfinite(out).all()), "unwritten output or a leaked unseen slot"
        err = np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32)).max()
        assert err < 2e-2, err  # bf16 output rounding of values of order 1
        # the cache: the new row written where in range, every other slot as given (NaN where poisoned)
        _, want_k, want_v = dense_decode_attention_reference(q, kn, vn, poison_unseen(ck, pos),
                                                             poison_unseen(cv, pos), pos, scale=scale)
        for new, want in ((nk, want_k), (nv, want_v)):
            np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(want, np.float32))
        assert not np.array_equal(np.asarray(nk), np.asarray(poison_unseen(ck, pos)), equal_nan=True)


class TestKernelInterpret(KernelCases):
    interpret = True


@pytest.mark.gpu
class TestKernelGPU(KernelCases):
    interpret = False

    def test_glm_decode_shape(self):
        """GLM-4-9B at batch 32 over a 640-slot cache, the default splits and blocks."""
        case = (32, 32, 2, 128, 640, tuple(range(500, 532)), None, 64)
        q, kn, vn, ck, cv, pos = make(case, 7)
        out, nk, _ = jax.jit(lambda *a: dense_decode_attention(*a, _poison=True))(q, kn, vn, ck, cv, pos)
        ref_out, ref_k, _ = dense_decode_attention_reference(q, kn, vn, ck, cv, pos, scale=128 ** -0.5)
        assert np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32)).max() < 2e-2
        np.testing.assert_array_equal(np.asarray(nk, np.float32), np.asarray(ref_k, np.float32))


def test_bad_inputs_are_named():
    q, kn, vn, ck, cv, pos = make(CASES[0], 1)
    with pytest.raises(ValueError, match="k_new must be"):
        dense_decode_attention(q, kn[:, :1], vn, ck, cv, pos)
    with pytest.raises(ValueError, match="positions must be an integer"):
        dense_decode_attention(q, kn, vn, ck, cv, pos.astype(jnp.float32))
    with pytest.raises(ValueError, match="multiple of the cache's KV heads"):
        dense_decode_attention(q[:, :7], kn, vn, ck, cv, pos)
    with pytest.raises(ValueError, match="backend="):
        dense_decode_attention(q, kn, vn, ck, cv, pos, backend="cuda")


def test_dense_cache_decode_kernel_equals_xla_path():
    """A tiny GLM: greedy decoding with the fused kernel (interpret mode on CPU) gives the XLA path's tokens
    over ragged prompts, and the bad option is refused."""
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.model.glm import GLMForCausalLM

    cfg = GLMConfig.from_preset("tiny", num_layers=2)
    # float32: a random model's near-tied logits flip under bfloat16 summation-order changes
    model = GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(3))
    prompts = [[5, 9, 11, 2, 7], [3, 4]]
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    toks = {}
    for kernel in ("xla", "pallas"):
        cache = DenseKVCache.create(cfg, len(prompts), 128, jnp.float32, decode_kernel=kernel)
        toks[kernel] = np.stack([np.asarray(t) for t in decode_stream(model, prompts, gen, cache=cache)])
    assert toks["xla"].shape == (6, 2)
    np.testing.assert_array_equal(toks["pallas"], toks["xla"])
    with pytest.raises(ValueError, match="decode_kernel="):
        DenseKVCache.create(cfg, 1, 128, jnp.bfloat16, decode_kernel="triton")


@pytest.mark.gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
def test_sharded_over_two_gpus_matches_reference():
    """sharding.kernels.sharded_dense_decode_attention on a tensor-2 mesh: each GPU runs the kernel on its KV head."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import make_mesh
    from sharding.kernels import sharded_dense_decode_attention

    mesh = make_mesh(tensor=2)
    case = (8, 32, 2, 128, 256, tuple(range(100, 108)), None, 64)
    q, kn, vn, ck, cv, pos = make(case, 11)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    args = (put(q, P(None, "tensor", None)), put(kn, P(None, "tensor", None)), put(vn, P(None, "tensor", None)),
            put(ck, P(None, "tensor", None, None)), put(cv, P(None, "tensor", None, None)), put(pos, P()))
    out, nk, _ = jax.jit(lambda *a: sharded_dense_decode_attention(mesh, *a, scale=128 ** -0.5))(*args)
    ref_out, ref_k, _ = dense_decode_attention_reference(q, kn, vn, ck, cv, pos, scale=128 ** -0.5)
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32)).max() < 2e-2
    np.testing.assert_array_equal(np.asarray(nk, np.float32), np.asarray(ref_k, np.float32))
