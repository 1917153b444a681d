"""The serving engine (paged cache + runner + LLM) against dense-cache generation, on a small random model (CPU).

Greedy engine output must equal ``autoglm_jax.generate.generate`` token for token: chunked prefill, prefix
hits with copy-on-write, preemption under a tiny pool. int8 KV is checked for closeness, not equality.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.engine import LLM, KVPages, PagedKVCache, SamplingParams, num_compilations
from .engine_fixtures import CFG, dense, greedy, make_model, random_prompts

ENGINE = dict(page_size=8, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128)


@pytest.fixture(scope="module")
def model():
    return make_model()


def run_all(llm):
    """Steps until idle; returns the plans."""
    plans = []
    while llm.has_unfinished():
        plan, inputs = llm.schedule()
        plans.append(plan)
        llm.finish_step(plan, llm.run(plan, inputs))
    return plans


def test_greedy_equals_dense_with_chunked_prefill(model):
    prompts = random_prompts((5, 19, 45, 70))
    llm = LLM(model, num_pages=64, **ENGINE)
    ids = [llm.add_request(p, greedy(8)) for p in prompts]
    plans = run_all(llm)
    chunks = [s for plan in plans for s in plan.requests if s.request_id == ids[3] and s.is_prefill]
    assert len(chunks) >= 3  # 70 prompt tokens under a 32-token budget
    assert any(s.positions[0] % ENGINE["page_size"] for s in chunks)  # a chunk starts mid-page
    assert [llm.completions[i].token_ids for i in ids] == dense(model, prompts, 8)


def test_gpu_kernel_code_in_interpret_mode_equals_dense(model):
    """The Pallas GPU kernels (ragged prefill and decode), run by the interpreter on CPU, inside the engine."""
    prompts = random_prompts((5, 21, 40), seed=13)
    llm = LLM(model, num_pages=32, interpret=True, **{**ENGINE, "max_num_seqs": 4, "max_model_len": 64})
    got = [c.token_ids for c in llm.generate(prompts, greedy(4))]
    assert any(k[3] for k in llm.runner.shape_keys) and any(not k[3] for k in llm.runner.shape_keys)
    assert got == dense(model, prompts, 4)


def test_prefix_hits_and_copy_on_write_match_dense(model):
    prefix = random_prompts((40,), seed=1)[0]  # 5 full pages of 8
    a = prefix + random_prompts((8,), seed=2)[0]   # 48 tokens: 6 full pages
    b = prefix + random_prompts((13,), seed=3)[0]
    c = list(a)                                    # fully cached while a still runs: last page copied on write
    llm = LLM(model, num_pages=64, **ENGINE)
    ra = llm.add_request(a, greedy(10))
    plans = []
    while not llm.completions[ra].token_ids:
        plan, inputs = llm.schedule()
        plans.append(plan)
        llm.finish_step(plan, llm.run(plan, inputs))
    rb, rc = llm.add_request(b, greedy(10)), llm.add_request(c, greedy(10))
    plans += run_all(llm)
    assert llm.stats().prefix_hit_rate > 0
    assert llm.completions[rb].num_cached_tokens == 40
    assert llm.completions[rc].num_cached_tokens == 47  # all but the last token, whose logits are needed
    copies = [op for plan in plans for op in plan.copy_ops]
    assert copies
    src, dst = copies[0]  # the page was copied on device before c wrote its last token into the copy
    for k in llm.runner.pages.k + llm.runner.pages.v:
        k = np.asarray(k)
        np.testing.assert_array_equal(k[:, dst, :7], k[:, src, :7])
        np.testing.assert_allclose(k[:, dst, 7], k[:, src, 7], rtol=1e-5, atol=1e-6)
    want = dense(model, [a, b, c], 10)
    assert [llm.completions[r].token_ids for r in (ra, rb, rc)] == want


def test_preemption_under_tiny_pool_matches_dense(model):
    prompts = random_prompts((21, 26, 30, 17), seed=4)
    llm = LLM(model, num_pages=17, **ENGINE)  # 16 usable pages: one full context; 4 x ~7 pages do not fit
    ids = [llm.add_request(p, greedy(30)) for p in prompts]
    run_all(llm)
    assert llm.stats().preemptions > 0
    assert [llm.completions[i].token_ids for i in ids] == dense(model, prompts, 30)
    assert llm.stats().pages_in_use == 0


def _paged_prefill_logits(model, prompt, kv_dtype):
    """Logits of a prompt prefilled through PagedKVCache (pages 1.. in order), packed as a [1, T] batch."""
    import jax
    import jax.numpy as jnp
    L, t = 8, len(prompt)
    n_pages = -(-t // L)
    pages = KVPages.create(CFG, num_pages=n_pages + 1, page_size=L, dtype=kv_dtype)
    cache = PagedKVCache(pages=pages, slot_mapping=jnp.arange(t, dtype=jnp.int32) + L,
                         page_table=jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None],
                         context_lens=jnp.array([t], jnp.int32), query_start=jnp.array([0, t], jnp.int32),
                         num_seqs=jnp.array([1], jnp.int32))
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, cache):
        m = nnx.merge(graphdef, state)
        h, _ = m.hidden_states(ids, jnp.arange(t, dtype=jnp.int32)[None], cache=cache)
        return m.logits(h[0])

    return np.asarray(run(state, jnp.array([prompt], jnp.int32), cache))


def test_paged_cache_logits_float_exact_int8_close(model):
    prompt = random_prompts((29,), seed=5)[0]
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    want = np.asarray(forward(state, np.array([prompt], np.int32))[0])  # cache-free causal forward
    got_f32 = _paged_prefill_logits(model, prompt, "float32")
    np.testing.assert_allclose(got_f32, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)
    got_i8 = _paged_prefill_logits(model, prompt, "int8")
    err = np.abs(got_i8 - want).max() / np.abs(want).max()
    assert err < 2e-2, err  # per-token per-head int8 KV: about 1/254 relative error per element
    assert not np.array_equal(got_i8, got_f32)  # the int8 path was really taken


def test_int8_kv_engine_tokens_mostly_agree(model):
    prompts = random_prompts((12, 33, 50), seed=6)
    llm = LLM(model, num_pages=64, kv_dtype="int8", **ENGINE)
    assert llm.runner.pages.quantized
    got = [c.token_ids for c in llm.generate(prompts, greedy(12))]
    want = dense(model, prompts, 12)
    assert [g[0] for g in got] == [w[0] for w in want]  # first tokens (prefill logits) agree
    agree = np.mean([x == y for g, w in zip(got, want) for x, y in zip(g, w)])
    assert agree >= 0.75, agree


def test_no_recompilation_after_warmup_over_mixed_workload(model):
    llm = LLM(model, num_pages=48, **ENGINE)
    n_shapes = llm.warmup()
    assert n_shapes == len(llm.runner.all_shape_keys())
    before = num_compilations()
    shared = random_prompts((24,), seed=7)[0]
    sampled = SamplingParams(max_tokens=9, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    rng = np.random.default_rng(8)
    live = []
    for wave in range(3):  # staggered arrivals: prefill chunks mixed with decodes, prefix hits, an abort
        for i, n in enumerate(rng.integers(2, 90, 4)):
            prompt = (shared if i % 2 else []) + random_prompts((int(n),), seed=100 * wave + i)[0]
            live.append(llm.add_request(prompt[:120], sampled if i % 3 == 0 else greedy(int(rng.integers(1, 14)))))
        for _ in range(3):
            llm.step()
        if wave == 1:
            llm.abort(live[-1])
    while llm.has_unfinished():
        llm.step()
    assert num_compilations() == before
    assert len(llm.runner.shape_keys) >= 4  # the workload really used several shapes ...
    assert llm.runner.shape_keys <= set(llm.runner.all_shape_keys())  # ... all of them warmed up
    assert llm.stats().prefix_hit_rate > 0


def test_closed_stream_frees_its_pages(model):
    llm = LLM(model, num_pages=64, **ENGINE)
    other = llm.add_request(random_prompts((20,), seed=9)[0], greedy(40))
    stream = llm.stream(random_prompts((30,), seed=10)[0], greedy(60))
    got = [next(stream) for _ in range(3)]
    assert len(got) == 3 and llm.stats().pages_in_use > 0
    stream.close()
    assert llm.completions[other].finish_reason is None  # still running
    llm.abort(other)
    pool = llm.scheduler.pool
    assert llm.stats().pages_in_use == 0 and pool.num_free_pages == pool.num_pages - 1
    assert [c.finish_reason for c in llm.completions.values()] == ["abort", "abort"]


def test_bad_requests_rejected_clearly_others_finish(model):
    llm = LLM(model, num_pages=64, **ENGINE)
    good = [llm.add_request(p, greedy(5)) for p in random_prompts((7, 15))]
    bad = [
        ([], "prompt is empty"),
        ([1, CFG.vocab_size + 3], "outside the vocabulary"),
        (list(range(1, 200)), "context holds 128"),
        ("hello", "needs a tokenizer"),
    ]
    for prompt, msg in bad:
        with pytest.raises(ValueError, match=msg):
            llm.add_request(prompt, greedy(5))
    with pytest.raises(ValueError, match="already in use"):
        llm.add_request([3, 4], greedy(5), request_id=good[0])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # generate() checks all before queueing
        llm.generate([[5, 6], [CFG.vocab_size]], greedy(3))
    assert len(llm.scheduler.requests) == 2
    run_all(llm)
    assert [len(llm.completions[g].token_ids) for g in good] == [5, 5]


def test_seeded_sampling_reproducible_per_request(model):
    prompt = random_prompts((11,), seed=11)[0]
    sp = lambda seed: SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
    alone = LLM(model, num_pages=64, **ENGINE).generate(prompt, sp(123))[0].token_ids
    crowd = LLM(model, num_pages=64, **ENGINE)
    ids = [crowd.add_request(p, sp(s)) for p, s in zip(random_prompts((30, 5), seed=12), (1, 2))]
    rid = crowd.add_request(prompt, sp(123))
    run_all(crowd)
    assert crowd.completions[rid].token_ids == alone  # same seed, different batch: same draws
    other = LLM(model, num_pages=64, **ENGINE).generate(prompt, sp(124))[0].token_ids
    assert other != alone
    assert len(set(alone)) > 1  # really sampled, not a repeated argmax
    assert all(crowd.completions[i].finished for i in ids)


def test_buckets_cover_all_sizes_and_reject_bad_lists():
    from autoglm_jax.engine import Buckets
    b = Buckets.make(max_num_batched_tokens=100, max_num_seqs=24, max_pages_per_seq=600)
    assert b.tokens == (16, 32, 64, 100) and b.seqs == (4, 8, 16, 24) and b.pages == (256, 512, 600)
    assert [Buckets.pick(b.tokens, n) for n in (1, 16, 17, 99, 100)] == [16, 16, 32, 100, 100]
    with pytest.raises(ValueError, match="exceeds the largest bucket 100"):
        Buckets.pick(b.tokens, 101)
    with pytest.raises(ValueError, match="largest is 24"):
        Buckets.make(max_num_batched_tokens=100, max_num_seqs=24, max_pages_per_seq=8, seq_buckets=(8, 16))
    custom = Buckets.make(max_num_batched_tokens=2048, max_num_seqs=256, max_pages_per_seq=88,
                          token_buckets=(1024, 2048), seq_buckets=(32, 256, 64))
    assert custom.seqs == (32, 64, 256) and len(custom.shape_keys(sampled=False)) == 5


def test_text_prompts_and_output_text_with_a_tokenizer(model):
    class Tok:  # a stand-in tokenizer: one token per character
        def encode(self, s):
            return [1 + ord(ch) % (CFG.vocab_size - 1) for ch in s]

        def decode(self, ids):
            return " ".join(map(str, ids))

    llm = LLM(model, num_pages=64, tokenizer=Tok(), **ENGINE)
    (c,) = llm.generate("hello world", greedy(5))
    assert c.prompt_token_ids == tuple(Tok().encode("hello world"))
    assert c.text == Tok().decode(c.token_ids) and len(c.token_ids) == 5
    assert c.token_ids == dense(model, [list(c.prompt_token_ids)], 5)[0]
    streamed = list(llm.stream("hello world", greedy(5)))
    assert streamed == c.token_ids


@pytest.mark.gpu
def test_default_prefill_kernel_in_the_engine_matches_triton():
    """A bfloat16 model's engine on the GPU: the dispatch's prefill kernel (Mosaic GPU on Hopper, head_dim 64) gives
    the Triton kernel's greedy tokens, over chunked prefills that start mid-page and cross query blocks."""
    from autoglm_jax.loading import random_model

    model = random_model(CFG, dtype="bfloat16", seed=0)
    prompts = random_prompts((5, 19, 45, 70, 300), seed=3)
    tokens = []
    for backend in (None, "triton"):
        llm = LLM(model, num_pages=160, attention_backend=backend,
                  **{**ENGINE, "page_size": 16, "max_num_batched_tokens": 136, "max_model_len": 512})
        ids = [llm.add_request(p, greedy(8)) for p in prompts]
        run_all(llm)
        tokens.append([llm.completions[i].token_ids for i in ids])
    assert tokens[0] == tokens[1]
