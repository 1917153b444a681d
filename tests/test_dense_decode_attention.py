"""Fused dense decode attention (kernels_pallas/dense_decode_attention.py): kernel vs reference (also the rows
variant, RoPE applied in the kernel), rope_tables vs apply_rope, and the DenseKVCache decode path that uses the
rows kernel vs the XLA path.

Every kernel case runs with NaN-poisoned outputs (``_poison=True``) and NaN in every cache slot the query
must not see (slots past its position, including the slot being written), fresh random non-zero inputs,
several splits (some empty) and positions at 0, inside, at the last slot and past the cache (dropped).
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from autoglm_jax.model.rope import apply_rope, rope_tables
from kernels_pallas.dense_decode_attention import (dense_decode_attention, dense_decode_attention_reference,
                                                   dense_decode_attention_rows,
                                                   dense_decode_attention_rows_reference, rotate_pairs)

# (B, N, K, H, S, positions, splits, block_s)
# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_rows_match_reference[small-group-full]',
    'test_rows_match_reference[one-split-full]',
    'test_rows_match_reference[glm-group-full]',
    'test_matches_reference[small-group]',
}


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


def make_rows(case, seed, rotary):
    """qkv [B, N + 2K, H] and rope tables (rotary: "partial" = H/2 features rotate, GLM's, or "full") for a case."""
    b, n, k, h, s, pos, _, _ = case
    ks = jax.random.split(jax.random.key(seed), 3)
    qkv = jax.random.normal(ks[0], (b, n + 2 * k, h), jnp.float32).astype(jnp.bfloat16)
    ck, cv = (jax.random.normal(kk, (b, k, s, h), jnp.float32).astype(jnp.bfloat16) for kk in ks[1:])
    pos = jnp.asarray(pos, jnp.int32)
    cos, sin = rope_tables(pos, head_dim=h, rotary_dim=h // 2 if rotary == "partial" else h, theta=10000.0,
                           dtype=jnp.bfloat16)
    return qkv, ck, cv, pos, cos, sin


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

    @pytest.mark.parametrize("rotary", ["partial", "full"])
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_rows_match_reference(self, case, rotary):
        """From whole qkv rows: q and k_new rotated in the kernel, the rotated k_new in the cache bit for bit."""
        qkv, ck, cv, pos, cos, sin = make_rows(case, sum(case[:5]) + len(rotary), rotary)
        scale = case[3] ** -0.5
        ref_out, _, _ = dense_decode_attention_rows_reference(qkv, ck, cv, pos, cos, sin, scale=scale)
        f = jax.jit(lambda *a: dense_decode_attention_rows(*a, scale=scale, splits=case[6], block_s=case[7],
                                                           interpret=self.interpret, _poison=True))
        ck, cv = poison_unseen(ck, pos), poison_unseen(cv, pos)
        out, nk, nv = f(qkv, ck, cv, pos, cos, sin)
        assert out.shape == (case[0], case[1], case[3]) and out.dtype == qkv.dtype
        assert bool(jnp.isfinite(out).all()), "unwritten output or a leaked unseen slot"
        err = np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32)).max()
        assert err < 2e-2, err
        _, want_k, want_v = dense_decode_attention_rows_reference(qkv, ck, cv, pos, cos, sin, scale=scale)
        for new, want in ((nk, want_k), (nv, want_v)):
            np.testing.assert_array_equal(np.asarray(new, np.float32), np.asarray(want, np.float32))
        # the rows reference is the plain one on rotated q / k (v as given): the cache holds the rotated key
        n, k = case[1], case[2]
        rot = rotate_pairs(qkv[:, :n + k], cos[:, None], sin[:, None])
        _, plain_k, _ = dense_decode_attention_reference(rot[:, :n], rot[:, n:], qkv[:, n + k:], ck, cv, pos,
                                                         scale=scale)
        np.testing.assert_array_equal(np.asarray(nk, np.float32), np.asarray(plain_k, np.float32))


    def test_rows_write_o_proj_digits_at_one_row(self, splits=3):
        """With ``digits=H`` at one row and G = 16 query heads a KV head, the combine writes out's digit planes
        too (``decode_combine.combine_planes``): out as without them (within the combine's float32 order), and the
        planes those of out as o_proj takes it, bit for bit; elsewhere the fourth result is None."""
        from kernels_pallas.qmatmul_dp4a import digit_planes_pallas
        case = (1, 32, 2, 128, 256, (200,), splits, 64)
        qkv, ck, cv, pos, cos, sin = make_rows(case, 11 + splits, "partial")
        f = lambda *a, d=128: jax.jit(lambda *a: dense_decode_attention_rows(  # noqa: E731
            *a, splits=splits, block_s=64, digits=d, interpret=self.interpret))(*a)
        out, nk, _, dg = f(qkv, ck, cv, pos, cos, sin)
        plain, plain_k, _ = dense_decode_attention_rows(qkv, ck, cv, pos, cos, sin, splits=splits, block_s=64,
                                                         interpret=self.interpret)
        assert np.abs(np.asarray(out, np.float32) - np.asarray(plain, np.float32)).max() <= 2 ** -7
        np.testing.assert_array_equal(np.asarray(nk, np.float32), np.asarray(plain_k, np.float32))
        want = digit_planes_pallas(out.reshape(1, -1), 128, interpret=self.interpret)
        assert dg.group == 128
        for got, w in zip((dg.digits, dg.group_sums, dg.step), want):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
        assert f(qkv, ck, cv, pos, cos, sin, d=64)[3] is None  # a group other than H
        from kernels_pallas.dense_decode_attention import planes_apply
        assert planes_apply(1, 16, 128, 128) and planes_apply(1, 32, 64, 64)
        assert not any((planes_apply(2, 16, 128, 128), planes_apply(1, 8, 128, 128), planes_apply(1, 24, 128, 128),
                        planes_apply(1, 16, 128, 64), planes_apply(1, 16, 128, None)))


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

    def test_glm_rows_decode_shape(self):
        """The rows kernel at GLM-4-9B's batch-32 decode shape (partial rotary), the default splits and blocks."""
        case = (32, 32, 2, 128, 640, tuple(range(500, 532)), None, 64)
        qkv, ck, cv, pos, cos, sin = make_rows(case, 7, "partial")
        out, nk, nv = jax.jit(lambda *a: dense_decode_attention_rows(*a, _poison=True))(qkv, ck, cv, pos, cos, sin)
        ref_out, ref_k, ref_v = dense_decode_attention_rows_reference(qkv, ck, cv, pos, cos, sin, scale=128 ** -0.5)
        assert np.abs(np.asarray(out, np.float32) - np.asarray(ref_out, np.float32)).max() < 2e-2
        np.testing.assert_array_equal(np.asarray(nk, np.float32), np.asarray(ref_k, np.float32))
        np.testing.assert_array_equal(np.asarray(nv, np.float32), np.asarray(ref_v, np.float32))


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


def test_bad_rows_inputs_are_named():
    """qkv's rows must be N + 2K with N a positive multiple of the cache's K (K=2 here: even, at least 6)."""
    qkv, ck, cv, pos, cos, sin = make_rows(CASES[0], 1, "partial")  # N=8, K=2: 12 rows
    for rows in (11, 4):
        with pytest.raises(ValueError, match="a multiple of 2, at least 6; got " + str(rows)):
            dense_decode_attention_rows(qkv[:, :rows], ck, cv, pos, cos, sin, interpret=True)
    with pytest.raises(ValueError, match=r"rope_sin must be a float \[B, H\] = \(3, 64\)"):
        dense_decode_attention_rows(qkv, ck, cv, pos, cos, sin[:, :32], interpret=True)
    with pytest.raises(ValueError, match="rope_cos must be a float"):
        dense_decode_attention_rows(qkv, ck, cv, pos, cos[:2], sin, interpret=True)
    with pytest.raises(ValueError, match="qkv must be in the cache's dtype"):
        dense_decode_attention_rows(qkv.astype(jnp.float32), ck, cv, pos, cos, sin, interpret=True)
    with pytest.raises(ValueError, match=r"qkv must be \[B, N \+ 2K, H\]"):
        dense_decode_attention_rows(qkv[:, None], ck, cv, pos, cos, sin, interpret=True)
    with pytest.raises(ValueError, match="do not match qkv"):
        dense_decode_attention_rows(qkv[:2], ck, cv, pos[:2], cos[:2], sin[:2], interpret=True)


@pytest.mark.parametrize("rotary_dim", [32, 64], ids=["partial", "full"])
def test_rope_tables_match_apply_rope(rotary_dim):
    """x * cos + swap(x) * sin with rope_tables is apply_rope: the same float32 products in float32 (to an ulp
    of float32: a*b - c*d may fuse differently), within bfloat16 rounding in bfloat16 (rounded once here, after
    each operation in apply_rope)."""
    b, heads, h = 4, 3, 64
    pos = jnp.asarray([0, 1, 517, 8191], jnp.int32)
    x = jax.random.normal(jax.random.key(5), (b, heads, h), jnp.float32)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        cos, sin = rope_tables(pos, head_dim=h, rotary_dim=rotary_dim, theta=10000.0, dtype=dtype)
        assert cos.shape == sin.shape == (b, h) and cos.dtype == dtype
        got = rotate_pairs(x.astype(dtype), cos[:, None], sin[:, None])
        want = apply_rope(x.astype(dtype)[:, None], pos[:, None], rotary_dim=rotary_dim, theta=10000.0)[:, 0]
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)
        # the features past rotary_dim pass through exactly
        np.testing.assert_array_equal(np.asarray(got[..., rotary_dim:]), np.asarray(x.astype(dtype)[..., rotary_dim:]))


def spy_kernels(monkeypatch):
    """Count the fused kernels' traces through DenseKVCache: {"rows": n, "qkv": n}."""
    import autoglm_jax.kv_cache as kv_cache

    calls = {"rows": 0, "qkv": 0}
    for key, name in (("rows", "dense_decode_attention_rows"), ("qkv", "dense_decode_attention")):
        real = getattr(kv_cache, name)
        monkeypatch.setattr(kv_cache, name, lambda *a, _real=real, _key=key, **kw: calls.update(
            {_key: calls[_key] + 1}) or _real(*a, **kw))
    return calls


@pytest.mark.parametrize("quant", [None, "int8"])
def test_dense_cache_decode_kernel_equals_xla_path(quant, monkeypatch):
    """A tiny GLM (also int8-quantized: QuantizedLinear projections): greedy decoding with the fused kernel
    (interpret mode on CPU) gives the XLA path's tokens over ragged prompts; every layer of every traced decode
    step ran the rows kernel (qkv rows whole, RoPE in the kernel), never the q/k/v one; the bad option is refused."""
    from flax import nnx

    from autoglm_jax.config import GLMConfig
    from autoglm_jax.generate import GenerationConfig, decode_stream
    from autoglm_jax.kv_cache import DenseKVCache
    from autoglm_jax.model import quantize_model
    from autoglm_jax.model.glm import GLMForCausalLM

    cfg = GLMConfig.from_preset("tiny", num_layers=2)
    # float32: a random model's near-tied logits flip under bfloat16 summation-order changes
    model = GLMForCausalLM(cfg, dtype="float32", rngs=nnx.Rngs(3))
    if quant:
        quantize_model(model, quant)
    prompts = [[5, 9, 11, 2, 7], [3, 4]]
    gen = GenerationConfig(max_new_tokens=6, eos_token_ids=())
    toks = {}
    calls = spy_kernels(monkeypatch)
    for kernel in ("xla", "pallas"):
        cache = DenseKVCache.create(cfg, len(prompts), 128, jnp.float32, decode_kernel=kernel)
        toks[kernel] = np.stack([np.asarray(t) for t in decode_stream(model, prompts, gen, cache=cache)])
        if kernel == "xla":
            assert calls == {"rows": 0, "qkv": 0}
    assert toks["xla"].shape == (6, 2)
    np.testing.assert_array_equal(toks["pallas"], toks["xla"])
    assert calls["qkv"] == 0 and calls["rows"] > 0 and calls["rows"] % cfg.num_layers == 0, calls
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
