"""The benchmarks' trace timing (``experiments.bench_common.call_spans``): traced kernels -> each call's GPU span."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

bench_common = importlib.import_module("experiments.bench_common")


def test_call_spans_cut_calls_at_their_own_kernels_and_leave_out_host_gaps():
    rng = np.random.default_rng(0)
    events, t, expected = [], 0, []
    for _ in range(5):  # 5 calls of 3 kernels, a random host gap before each
        t += int(rng.integers(10_000, 90_000))
        start = t
        for dur in rng.integers(1_000, 20_000, size=3):
            events.append((t, t + int(dur)))
            t += int(dur) + int(rng.integers(0, 1_500))  # small gaps between a call's kernels count
        expected.append(events[-1][1] - start)
    assert bench_common.call_spans(events, 5) == expected


def test_call_spans_take_the_latest_end_when_kernels_overlap():
    events = [(0, 50), (10, 30), (100, 120), (105, 160)]  # two streams: a kernel ends after the next one starts
    assert bench_common.call_spans(events, 2) == [50, 60]


@pytest.mark.parametrize("n_events,calls", [(7, 3), (0, 2)])
def test_call_spans_reject_counts_that_do_not_split_into_calls(n_events, calls):
    with pytest.raises(RuntimeError, match="GPU kernels traced for"):
        bench_common.call_spans([(i, i + 1) for i in range(n_events)], calls)


def test_op_timer_gives_every_unrolled_layer_its_own_activation():
    """bench_qmatmul's layer timer: one x shared by the unrolled layers let XLA compute activation-only work once a
    call (the int8 / int4 digit preps, W8A8's quantization) and merge the bf16 dots; each layer now gets its own x.
    In the compiled call an activation-only row reduction (like the int8 split path's absmax) runs once a layer,
    where the shared form ran it once."""
    import re

    import jax
    import jax.numpy as jnp

    bench_qmatmul = importlib.import_module("experiments.bench_qmatmul")
    x = jax.random.normal(jax.random.key(0), (2, 64), jnp.float32).astype(jnp.bfloat16)
    xs = bench_common.distinct_inputs(x, 4)
    assert len(xs) == 4 and xs[0] is x
    assert all(v.shape == x.shape and v.dtype == x.dtype for v in xs)
    assert all(not bool(jnp.array_equal(a, b)) for i, a in enumerate(xs) for b in xs[i + 1:])

    fn = lambda x, w: jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1) @ w  # noqa: E731
    ws = [jnp.full((2, 3), float(i + 1)) for i in range(4)]
    reductions = lambda f, *a: len(re.findall(r"reduce\(", f.lower(*a).compile().as_text()))  # noqa: E731
    assert reductions(bench_qmatmul.unrolled(fn), xs, ws) == 4
    assert reductions(jax.jit(lambda x, ws: [fn(x, w) for w in ws]), x, ws) == 1  # the old, shared form
    _, measure = bench_qmatmul.layer_timer(fn, x, ws, timing="wall", min_sample_s=1e-4, samples=1)
    assert measure() > 0
