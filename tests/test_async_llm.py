"""AsyncLLM: concurrent streams equal dense generation; cancellation frees pages at once; bad requests fail
alone. Small random model on CPU; each test drives its own event loop with ``asyncio.run``."""

from __future__ import annotations

import asyncio

import pytest

from autoglm_jax.engine import AsyncLLM
from .engine_fixtures import CFG, dense, greedy, make_model, random_prompts

ENGINE = dict(page_size=8, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128, num_pages=64)


@pytest.fixture(scope="module")
def model():
    return make_model()


async def collect(engine, prompt, params, **kw):
    outs = [o async for o in engine.generate(prompt, params, **kw)]
    return outs


def test_concurrent_streams_equal_dense(model):
    prompts = random_prompts((9, 40, 23), seed=20)

    async def main():
        engine = AsyncLLM(model, **ENGINE)
        try:
            return await asyncio.gather(*(collect(engine, p, greedy(7)) for p in prompts))
        finally:
            engine.shutdown()

    results = asyncio.run(main())
    got = [[t for o in outs for t in o.new_token_ids] for outs in results]
    assert [outs[-1].finished for outs in results] == [True] * 3
    assert [o.finished for outs in results for o in outs[:-1]] == [False] * sum(len(r) - 1 for r in results)
    assert got == dense(model, prompts, 7)


def test_cancelled_consumer_frees_pages_others_continue(model):
    long_prompt, other_prompt = random_prompts((30, 12), seed=21)

    async def main():
        engine = AsyncLLM(model, **ENGINE)
        try:
            seen = asyncio.Event()
            got = []

            async def consume():
                async for o in engine.generate(long_prompt, greedy(100), request_id="long"):
                    got.append(o)
                    if len(got) == 2:
                        seen.set()

            other = asyncio.create_task(collect(engine, other_prompt, greedy(40), request_id="other"))
            task = asyncio.create_task(consume())
            await seen.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            pool = engine.engine.scheduler.pool
            with engine._lock:  # at once: before the engine takes another step
                long_pages = [r.page_ids for r in engine.engine.scheduler.running if r.request_id == "long"]
                in_use_other = sum(len(r.page_ids) for r in engine.engine.scheduler.running)
                in_use = pool.num_used_pages
            outs = await other
            with engine._lock:
                all_free = pool.num_free_pages == pool.num_pages - 1
            return long_pages, in_use, in_use_other, outs, all_free, engine.engine.completions["long"]
        finally:
            engine.shutdown()

    long_pages, in_use, in_use_other, outs, all_free, long_c = asyncio.run(main())
    assert long_pages == []  # no longer running
    assert in_use == in_use_other  # only the other request's pages remain in use
    assert long_c.finish_reason == "abort" and len(long_c.token_ids) < 100
    assert outs[-1].finished and outs[-1].num_output_tokens == 40  # the other request finished normally
    assert all_free


def test_bad_request_raises_while_others_run(model):
    good_prompt = random_prompts((15,), seed=22)[0]

    async def main():
        engine = AsyncLLM(model, **ENGINE)
        try:
            good = asyncio.create_task(collect(engine, good_prompt, greedy(12)))
            await asyncio.sleep(0)
            errors = []
            for prompt in ([], [CFG.vocab_size + 1], list(range(1, 300))):
                try:
                    await collect(engine, prompt, greedy(4))
                except ValueError as e:
                    errors.append(str(e))
            return errors, await good
        finally:
            engine.shutdown()

    errors, outs = asyncio.run(main())
    assert len(errors) == 3
    assert "empty" in errors[0] and "vocabulary" in errors[1] and "context" in errors[2]
    assert outs[-1].finished and outs[-1].num_output_tokens == 12


def test_abort_by_id_ends_the_stream(model):
    async def main():
        engine = AsyncLLM(model, **ENGINE)
        try:
            outs = []
            async for o in engine.generate(random_prompts((10,), seed=23)[0], greedy(100), request_id="x"):
                outs.append(o)
                if len(outs) == 3:
                    assert engine.abort("x")
            return outs, engine.stats()
        finally:
            engine.shutdown()

    outs, stats = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs) < 100 and stats.pages_in_use == 0 and stats.num_aborted == 1
