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
