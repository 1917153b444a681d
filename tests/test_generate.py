"""Generation over the dense KV cache and on-device sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax import GenerationConfig, GLMConfig, generate
from autoglm_jax.loading import random_model
from autoglm_jax.sampling import sample_tokens


@pytest.fixture(scope="module")
def model():
    cfg = GLMConfig.from_preset("tiny", num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4,
                                num_kv_heads=2, head_dim=16, vocab_size=97, max_position_embeddings=64,
                                eos_token_ids=())
    return random_model(cfg, seed=3)


def _greedy_no_cache(model, prompt, n, width=16):
    """Greedy tokens by re-running the whole sequence each step. The sequence sits right-padded in a fixed
    ``width`` window (one compile for every length): the model is causal, so the pad after position i cannot
    change the logits at i."""
    seq = list(prompt)
    for _ in range(n):
        assert len(seq) <= width
        logits = model(jnp.array([seq + [0] * (width - len(seq))]))[0, len(seq) - 1]
        seq.append(int(jnp.argmax(logits)))
    return seq[len(prompt):]


def test_cached_greedy_equals_recomputation_ragged_batch(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    got = generate(model, prompts, GenerationConfig(max_new_tokens=6))
    assert got == [_greedy_no_cache(model, p, 6) for p in prompts]


def test_stops_at_eos(model):
    free = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=6))[0]
    eos = free[2]
    stopped = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=6, eos_token_ids=(eos,)))[0]
    assert stopped == free[:free.index(eos) + 1]


def test_prompt_longer_than_context_rejected_before_work(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(model, [list(range(60))], GenerationConfig(max_new_tokens=5))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], GenerationConfig(max_new_tokens=5))


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0),
                                dict(top_p=1.5), dict(top_k=-2)])
def test_bad_generation_config(kw):
    with pytest.raises(ValueError):
        GenerationConfig(**kw)


def test_seeded_sampling_is_reproducible(model):
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(model, [[1, 2, 3]], cfg)
    assert a == generate(model, [[1, 2, 3]], cfg)
    others = [generate(model, [[1, 2, 3]], GenerationConfig(**{**cfg.__dict__, "seed": s}))[0] for s in range(8, 12)]
    assert any(o != a[0] for o in others)


def _draw(logits, n, **kw):
    b = logits.shape[0]
    keys = jax.random.split(jax.random.key(0), n)
    f = jax.jit(lambda k: sample_tokens(logits, jax.random.split(k, b), kw["t"], kw["k"], kw["p"]))
    return np.stack([np.asarray(f(k)) for k in keys])


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]], jnp.float32))
    ones = jnp.ones((2,), jnp.float32)
    draws = _draw(logits, 200, t=ones, k=jnp.array([2, 0], jnp.int32), p=jnp.array([1.0, 0.7], jnp.float32))
    assert set(draws[:, 0]) == {0, 1}  # top-k 2
    assert set(draws[:, 1]) == {0, 1}  # top-p 0.7: 0.5 + 0.3 reaches it
    draws = _draw(logits, 300, t=ones, k=jnp.zeros((2,), jnp.int32), p=jnp.ones((2,), jnp.float32))
    assert set(draws[:, 0]) == {0, 1, 2, 3}
    freq = np.mean(draws[:, 0] == 0)
    assert 0.4 < freq < 0.6


def test_temperature_zero_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (3, 50))
    z = jnp.zeros((3,), jnp.float32)
    got = sample_tokens(logits, jax.random.split(jax.random.key(2), 3), z, jnp.zeros((3,), jnp.int32),
                        jnp.ones((3,), jnp.float32))
    np.testing.assert_array_equal(np.asarray(got), np.argmax(np.asarray(logits), -1))


def test_row_chunked_prefill_equals_one_prefill(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42], [9, 9, 9, 9]]
    whole = generate(model, prompts, GenerationConfig(max_new_tokens=5))
    chunked = generate(model, prompts, GenerationConfig(max_new_tokens=5, max_prefill_tokens=7))  # 1 row a call
    halves = generate(model, prompts, GenerationConfig(max_new_tokens=5, max_prefill_tokens=14))  # 2 rows a call
    assert whole == chunked == halves
    assert whole == [_greedy_no_cache(model, p, 5) for p in prompts]


def test_prefill_rows():
    from autoglm_jax.generate import prefill_rows

    assert prefill_rows(32, 512, 4096) == 8
    assert prefill_rows(7, 512, 4096) == 7 and prefill_rows(7, 512, 2048) == 1
    assert prefill_rows(1, 10000, 4096) == 1


@pytest.mark.gpu
def test_decode_attention_reads_the_dense_cache_without_transposing_it():
    """No transpose in the compiled decode step has a whole cache layer's shape: the [B, K, S, H] layout
    lets XLA's batched GEMMs read K and V in place ([B, S, K, H] cost 4 cache transposes per layer). The XLA
    attention path (``decode_kernel="xla"``); the fused kernel, GPU's default, reads the cache itself."""
    import re

    cfg = GLMConfig.from_preset("tiny", num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, vocab_size=256)
    model = random_model(cfg, dtype="bfloat16", seed=0)
    from autoglm_jax.generate import decode_hlo
    from autoglm_jax.kv_cache import DenseKVCache

    batch, cache_len = 16, 512
    hlo = decode_hlo(model, DenseKVCache.create(cfg, batch, cache_len, model.dtype, decode_kernel="xla"), position=3)
    elems = batch * cache_len * cfg.num_kv_heads * cfg.head_dim
    shapes = [m.group(1) for m in re.finditer(r"= \w+\[([\d,]+)\]\S* transpose\(", hlo)]
    big = [s for s in shapes if np.prod([int(d) for d in s.split(",")]) >= elems]
    assert not big, big[:3]


def test_static_graph_interns_equal_graphs(model):
    """A second split of an equal model returns the same StaticGraph (jit compares its cached key by identity
    first, so decode steps of a later generate() call skip the full GraphDef comparison) and a flat tuple."""
    from autoglm_jax.model.static_graph import StaticGraph

    g1, leaves1 = StaticGraph.split(model)
    g2, leaves2 = StaticGraph.split(model)
    assert g1 is g2
    assert isinstance(leaves1, tuple) and all(isinstance(x, jax.Array) for x in leaves1)
    assert len(leaves1) == len(jax.tree.leaves(model))
    other = GLMConfig.from_preset("tiny", num_layers=3, hidden_size=64, intermediate_size=96, num_heads=4,
                                  num_kv_heads=2, head_dim=16, vocab_size=97)
    g3, _ = StaticGraph.split(random_model(other, seed=0))
    assert g3 is not g1 and g3 != g1
    merged = g1.merge(leaves2)
    np.testing.assert_array_equal(np.asarray(merged(jnp.array([[1, 2, 3]]))), np.asarray(model(jnp.array([[1, 2, 3]]))))
