"""Scheduler: continuous batching, chunked prefill, prefix reuse, copy-on-write, preemption, abort, stops.

A fake device stores (token, position) in every KV slot the plan writes and, for every scheduled request,
reads its whole context back through its block table, checking it against the test's own record of the
request's tokens. The fake model's next token is a function of that context, so a wrong slot mapping, a
missing copy-on-write or a bad prefix mapping changes the generated tokens or fails the read-back.
"""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm_jax.engine import (NULL_PAGE, Request, RequestStatus, SamplingParams, Scheduler, SchedulerConfig)

EOS = 1


def next_token(ctx):
    return (ctx[-1] * 7 + len(ctx) * 13 + sum(ctx[-4:])) % 97 + 3  # never EOS (1)


class FakeDevice:
    def __init__(self, cfg: SchedulerConfig):
        self.L = cfg.page_size
        self.kv = [[None] * self.L for _ in range(cfg.num_pages)]
        self.truth = {}  # request id -> tokens (prompt + output) known to the test

    def add(self, req: Request):
        self.truth[req.request_id] = list(req.prompt_token_ids)

    def step(self, plan, model=next_token):
        L = self.L
        for src, dst in plan.copy_ops:
            assert src != NULL_PAGE and dst != NULL_PAGE
            self.kv[dst] = list(self.kv[src])
        for r in plan.requests:
            assert len(r.token_ids) == len(r.positions) == len(r.slot_mapping) > 0
            assert list(r.positions) == list(range(r.positions[0], r.positions[0] + len(r.positions)))
            assert r.positions[-1] + 1 == r.num_computed_tokens
            for tok, pos, slot in zip(r.token_ids, r.positions, r.slot_mapping):
                assert slot == r.block_table[pos // L] * L + pos % L and slot // L != NULL_PAGE
                self.kv[slot // L][slot % L] = (tok, pos)
        sampled = {}
        for r in plan.requests:
            ctx = [self.kv[r.block_table[p // L]][p % L] for p in range(r.num_computed_tokens)]
            assert ctx == [(t, p) for p, t in enumerate(self.truth[r.request_id][:r.num_computed_tokens])], \
                f"{r.request_id}: cache does not hold its context"
            if r.sample:
                sampled[r.request_id] = model([t for t, _ in ctx])
        return sampled


def one_step(sched, dev, model=next_token):
    plan = sched.schedule()
    outs = sched.update(plan, dev.step(plan, model))
    for out in outs:
        dev.truth[out.request_id].extend(out.new_token_ids)
    return plan, outs


def run(sched, dev, *, model=next_token, max_steps=500, on_step=None):
    results = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        plan = sched.schedule()
        assert plan.num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(plan.requests) <= sched.config.max_num_seqs
        sampled = dev.step(plan, model)
        if on_step is not None:
            on_step(plan)
        for out in sched.update(plan, sampled):
            dev.truth[out.request_id].extend(out.new_token_ids)
            if out.finished:
                results[out.request_id] = out
    assert not sched.has_unfinished()
    return results


def make(num_pages=64, page_size=4, max_model_len=64, **kw):
    cfg = SchedulerConfig(num_pages=num_pages, page_size=page_size, max_model_len=max_model_len,
                          eos_token_ids=(EOS,), vocab_size=100, **kw)
    return Scheduler(cfg), FakeDevice(cfg)


def add(sched, dev, rid, prompt, max_tokens=5, **kw):
    req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), **kw)
    sched.add_request(req)
    dev.add(req)
    return req


def reference_tokens(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(next_token(toks))
    return toks[len(prompt):]


def test_continuous_batching_admits_and_retires_every_step():
    sched, dev = make(max_num_seqs=2)
    prompts = {"a": [5, 6, 7], "b": [8, 9], "c": [10, 11, 12, 13, 14], "d": [4]}
    lengths = {"a": 2, "b": 6, "c": 3, "d": 4}
    for rid, p in prompts.items():
        add(sched, dev, rid, p, max_tokens=lengths[rid])
    history = []
    results = run(sched, dev, on_step=lambda plan: history.append([r.request_id for r in plan.requests]))
    for rid, p in prompts.items():
        assert dev.truth[rid][len(p):] == reference_tokens(p, lengths[rid])
        assert results[rid].finish_reason == "length" and results[rid].num_output_tokens == lengths[rid]
    # a finishes after step 2 (prefill samples its first token); c joins at step 3 while b keeps decoding
    assert history[0] == ["a", "b"] and history[1] == ["a", "b"] and history[2] == ["b", "c"]
    first_step = {rid: next(i for i, h in enumerate(history) if rid in h) for rid in prompts}
    last_step = {rid: max(i for i, h in enumerate(history) if rid in h) for rid in prompts}
    assert first_step["d"] == last_step["c"] + 1  # d takes c's seat the step after c retires
    assert sched.pool.num_used_pages == 0 and sched.stats().num_finished == 4


def test_chunked_prefill_respects_budget_and_crosses_pages():
    sched, dev = make(max_num_batched_tokens=10, page_size=4)
    prompt = list(range(3, 26))  # 23 tokens: chunks 10, 10, 3
    add(sched, dev, "long", prompt, max_tokens=2)
    plans = []
    run(sched, dev, on_step=plans.append)
    chunks = [len(p.requests[0].token_ids) for p in plans]
    assert chunks == [10, 10, 3, 1]
    assert [p.requests[0].sample for p in plans] == [False, False, True, True]
    first = plans[0].requests[0]
    assert first.positions == tuple(range(10))
    pages = first.block_table
    assert len(pages) == 3  # positions 0..9 cover pages 0, 1 and 2
    assert first.slot_mapping == tuple(pages[p // 4] * 4 + p % 4 for p in range(10))
    second = plans[1].requests[0]
    assert second.block_table[:3] == pages and second.positions[0] == 10
    assert dev.truth["long"][23:] == reference_tokens(prompt, 2)


def test_mixed_prefill_and_decode_share_the_budget():
    sched, dev = make(max_num_batched_tokens=8, page_size=4)
    add(sched, dev, "short", [3, 4], max_tokens=6)
    add(sched, dev, "long", list(range(10, 40)), max_tokens=2)
    plans = []
    run(sched, dev, on_step=plans.append)
    second = {r.request_id: len(r.token_ids) for r in plans[1].requests}
    assert second == {"short": 1, "long": 7}  # decode first, the prefill chunk takes the rest of the budget
    assert all(p.num_scheduled_tokens <= 8 for p in plans)
    assert dev.truth["long"][30:] == reference_tokens(list(range(10, 40)), 2)


def test_preemption_under_a_tiny_pool_completes_with_the_same_tokens():
    prompts = {f"r{i}": [3 + i, 20 + i, 7, 9, 11 + i] for i in range(4)}
    # 9 usable pages of 4 tokens; each request grows to 5 + 12 = 17 tokens = 5 pages
    sched, dev = make(num_pages=10, page_size=4, max_model_len=20, max_num_seqs=4)
    for rid, p in prompts.items():
        add(sched, dev, rid, p, max_tokens=12, priority=2)
    results = run(sched, dev)
    assert sched.stats().preemptions > 0
    for rid, p in prompts.items():
        assert dev.truth[rid][5:] == reference_tokens(p, 12), rid
        assert results[rid].finish_reason == "length"
    assert sched.pool.num_used_pages == 0


def test_preemption_victim_is_lowest_priority_latest():
    sched, dev = make(num_pages=7, page_size=4, max_model_len=24, max_num_seqs=3)
    low = add(sched, dev, "low", [3, 4, 5, 6], max_tokens=12, priority=1)
    high = add(sched, dev, "high", [7, 8, 9, 10], max_tokens=12, priority=3)
    preempted = []
    run(sched, dev, on_step=lambda plan: preempted.extend(plan.preempted_ids))
    assert preempted and set(preempted) == {"low"}
    assert low.num_preemptions >= 1 and high.num_preemptions == 0


def test_abort_frees_pages_immediately():
    sched, dev = make()
    a = add(sched, dev, "a", list(range(3, 13)), max_tokens=20)
    add(sched, dev, "b", [4, 5, 6], max_tokens=3)
    add(sched, dev, "w", [7, 8], max_tokens=3)
    one_step(sched, dev)
    used = sched.pool.num_used_pages
    a_pages = len(sched.requests["a"].page_ids)
    assert sched.abort("a") is True
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort" and not a.page_ids
    assert sched.pool.num_used_pages == used - a_pages
    assert sched.abort("a") is False and sched.abort("nope") is False
    # abort between schedule() and update(): the plan's entry is skipped, no output for it
    plan = sched.schedule()
    assert "a" in plan.finished_ids
    assert sched.abort("b")
    outs = sched.update(plan, dev.step(plan))
    for out in outs:
        dev.truth[out.request_id].extend(out.new_token_ids)
    assert "b" not in [o.request_id for o in outs]
    results = run(sched, dev)
    assert set(results) == {"w"} and sched.stats().num_aborted == 2
    assert sched.pool.num_used_pages == 0


def test_prefix_reuse_maps_cached_pages_without_recompute():
    sched, dev = make(page_size=4)
    shared = list(range(3, 15))  # 12 tokens = 3 full pages
    add(sched, dev, "first", shared + [50, 51], max_tokens=2)
    run(sched, dev)
    second = add(sched, dev, "second", shared + [60], max_tokens=2)
    plans = []
    run(sched, dev, on_step=plans.append)
    entry = plans[0].requests[0]
    assert entry.positions == (12,) and second.num_cached_tokens == 12
    assert dev.truth["second"][13:] == reference_tokens(shared + [60], 2)
    s = sched.stats()
    assert s.prefix_hit_tokens == 12 and s.prefix_lookup_tokens == 14 + 13
    assert s.prefix_hit_rate == pytest.approx(12 / 27)


def test_fully_cached_prompt_copies_the_shared_last_page():
    sched, dev = make(page_size=4)
    prompt = list(range(3, 11))  # exactly 2 full pages
    add(sched, dev, "a", prompt, max_tokens=8)
    one_step(sched, dev)
    one_step(sched, dev)  # a's first page pair is cached, a keeps running (holds the pages)
    add(sched, dev, "b", prompt, max_tokens=3)
    plan = sched.schedule()
    entry = {r.request_id: r for r in plan.requests}["b"]
    a_pages = sched.requests["a"].page_ids
    assert entry.positions == (7,)  # only the last token is recomputed
    assert len(plan.copy_ops) == 1
    src, dst = plan.copy_ops[0]
    assert src == a_pages[1] and dst == entry.block_table[1] and entry.block_table[0] == a_pages[0]
    for out in sched.update(plan, dev.step(plan)):
        dev.truth[out.request_id].extend(out.new_token_ids)
    run(sched, dev)
    assert dev.truth["b"][8:] == reference_tokens(prompt, 3)
    assert dev.truth["a"][8:] == reference_tokens(prompt, 8)


def test_fork_shares_pages_and_copies_on_write():
    sched, dev = make(page_size=4)
    add(sched, dev, "p", [3, 4, 5, 6, 7, 8], max_tokens=4)
    one_step(sched, dev)  # prefill 6 tokens, 1 sampled: page 1 is partial
    parent = sched.requests["p"]
    child = sched.fork("p", "c", SamplingParams(max_tokens=4, temperature=0.0))
    dev.truth["c"] = list(dev.truth["p"])
    assert child.page_ids == parent.page_ids and sched.pool.ref_count(parent.page_ids[1]) == 2
    orig = parent.page_ids[1]
    plan = sched.schedule()
    tables = {r.request_id: r.block_table for r in plan.requests}
    assert tables["p"][0] == tables["c"][0]  # the full first page stays shared
    # the parent writes first: it gets a private copy of the shared partial page; the child keeps the original
    assert plan.copy_ops == ((orig, tables["p"][1]),) and tables["c"][1] == orig
    for out in sched.update(plan, dev.step(plan)):
        dev.truth[out.request_id].extend(out.new_token_ids)
    run(sched, dev)
    assert dev.truth["c"] == dev.truth["p"]
    assert sched.pool.num_used_pages == 0


@pytest.mark.parametrize("make_request, match", [
    (lambda: Request("e", [], SamplingParams()), "prompt is empty"),
    (lambda: Request("long", list(range(3, 67)), SamplingParams()), "prompt has 64 tokens but the context holds 64"),
    (lambda: Request("oov", [3, 100], SamplingParams()), r"outside the vocabulary; allowed: \[0, 100\)"),
    (lambda: Request("prio", [3], SamplingParams(), priority=4), "priority=4 is unknown; allowed: \\(1, 2, 3\\)"),
    (lambda: Request("stop", [3], SamplingParams(stop=("x",))), "need a detokenize callback"),
    (lambda: Request("dup", [3], SamplingParams()), "already in use"),
])
def test_bad_requests_are_rejected_while_others_keep_running(make_request, match):
    sched, dev = make()
    add(sched, dev, "dup", [3, 4, 5], max_tokens=4)
    one_step(sched, dev)
    with pytest.raises(ValueError, match=match):
        sched.add_request(make_request())
    results = run(sched, dev)
    assert dev.truth["dup"][3:] == reference_tokens([3, 4, 5], 4) and results["dup"].finished


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens=0 must be an integer >= 1"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(temperature=-0.5), "temperature=-0.5 must be a number >= 0"),
    (dict(top_k=-1), "top_k=-1 must be an integer >= 0"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_stop_conditions():
    vocab = {t: chr(ord("a") + t % 26) for t in range(100)}
    detok = lambda ids: "".join(vocab[t] for t in ids)
    cfg = SchedulerConfig(num_pages=64, page_size=4, max_model_len=12, eos_token_ids=(EOS,))
    sched, dev = Scheduler(cfg, detokenize=detok), FakeDevice(cfg)
    script = {"eos": [5, 6, EOS, 7], "ign": [5, EOS, 6, 7], "tok": [5, 42, 6], "str": [2, 3, 4, 5, 6],
              "len": [5, 6, 7, 8, 9, 10], "ctx": [5] * 20}
    params = {"eos": SamplingParams(max_tokens=10), "ign": SamplingParams(max_tokens=3, ignore_eos=True),
              "tok": SamplingParams(max_tokens=10, stop_token_ids=(42,)),
              "str": SamplingParams(max_tokens=10, stop=("zz", "de")),
              "len": SamplingParams(max_tokens=4), "ctx": SamplingParams(max_tokens=50)}
    prompts = {rid: [3] * (8 if rid == "ctx" else 2) for rid in script}
    for rid in script:
        req = Request(rid, prompts[rid], params[rid])
        sched.add_request(req)
        dev.add(req)
    results = {}
    while sched.has_unfinished():
        plan = sched.schedule()
        dev.step(plan)
        sampled = {r.request_id: script[r.request_id][len(dev.truth[r.request_id]) - len(prompts[r.request_id])]
                   for r in plan.requests if r.sample}
        for out in sched.update(plan, sampled):
            dev.truth[out.request_id].extend(out.new_token_ids)
            if out.finished:
                results[out.request_id] = out
    gen = lambda rid: dev.truth[rid][len(prompts[rid]):]
    assert gen("eos") == [5, 6, EOS] and results["eos"].finish_reason == "stop" and results["eos"].stop_reason == EOS
    assert gen("ign") == [5, EOS, 6] and results["ign"].finish_reason == "length"
    assert gen("tok") == [5, 42] and results["tok"].stop_reason == 42
    assert gen("str") == [2, 3, 4] and results["str"].stop_reason == "de" and results["str"].text == "c"
    assert gen("len") == [5, 6, 7, 8] and results["len"].finish_reason == "length"
    assert gen("ctx") == [5] * 4 and results["ctx"].finish_reason == "length"  # 8 + 4 = max_model_len
    assert results["len"].text == "fghi"


def test_model_key_change_gives_no_prefix_hits():
    sched, dev = make(page_size=4)
    prompt = list(range(3, 15))
    add(sched, dev, "a", prompt, max_tokens=1)
    run(sched, dev)
    sched.set_model_key("new-checkpoint")
    b = add(sched, dev, "b", prompt, max_tokens=1)
    run(sched, dev)
    assert b.num_cached_tokens == 0 and sched.stats().prefix_hit_tokens == 0


def test_schedule_update_must_alternate_and_tokens_must_be_given():
    sched, dev = make()
    add(sched, dev, "a", [3, 4], max_tokens=2)
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="update\\(\\) was not called"):
        sched.schedule()
    with pytest.raises(KeyError, match="no sampled token for requests \\['a'\\]"):
        sched.update(plan, {})
    for out in sched.update(plan, dev.step(plan)):
        dev.truth[out.request_id].extend(out.new_token_ids)
    with pytest.raises(RuntimeError, match="outstanding step is None"):
        sched.update(plan, {})


def test_config_rejects_a_pool_smaller_than_one_context():
    with pytest.raises(ValueError, match="cannot hold one full context"):
        SchedulerConfig(num_pages=4, page_size=4, max_model_len=16)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_workload_with_aborts_never_leaks_and_matches_reference(data):
    num_pages = data.draw(st.integers(6, 14))
    sched, dev = make(num_pages=num_pages, page_size=4, max_model_len=20,
                      max_num_seqs=data.draw(st.integers(1, 4)),
                      max_num_batched_tokens=data.draw(st.integers(4, 16)),
                      eviction=data.draw(st.sampled_from(["lru", "priority"])))
    prompts, lengths, aborted = {}, {}, set()
    base = [3, 4, 5, 6, 7, 8, 9, 10]  # shared prefixes exercise the prefix cache
    for i in range(data.draw(st.integers(1, 6))):
        prompt = base[:data.draw(st.integers(0, 8))] + data.draw(st.lists(st.integers(3, 99), min_size=1,
                                                                          max_size=6))
        prompts[f"r{i}"], lengths[f"r{i}"] = prompt, data.draw(st.integers(1, 19 - len(prompt)))
        add(sched, dev, f"r{i}", prompt, max_tokens=lengths[f"r{i}"], priority=data.draw(st.integers(1, 3)))
    for _ in range(300):
        if not sched.has_unfinished():
            break
        if data.draw(st.integers(0, 9)) == 0:
            rid = data.draw(st.sampled_from(sorted(prompts)))
            if sched.abort(rid):
                aborted.add(rid)
        one_step(sched, dev)
        holders = collections.Counter(p for r in sched.running for p in r.page_ids)
        assert all(not r.page_ids for r in sched.waiting)
        for p in range(1, num_pages):
            assert sched.pool.ref_count(p) == holders[p]
        assert sched.pool.num_used_pages == len(holders)
    assert not sched.has_unfinished()
    assert sched.pool.num_used_pages == 0
    for rid, prompt in prompts.items():
        if rid not in aborted:
            assert dev.truth[rid][len(prompt):] == reference_tokens(prompt, lengths[rid]), rid
