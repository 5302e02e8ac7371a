"""The benchmarks' interleaved timing: the order the steps run in."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from acnorm_fused.bench.timing import balanced_order, time_interleaved


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6])
def test_balanced_order_has_every_ordered_pair_once(count):
    order = balanced_order(count)
    assert len(order) == max(count * (count - 1), 1)
    assert Counter(order) == {step: max(count - 1, 1) for step in range(count)}
    pairs = Counter(zip(order, order[1:] + order[:1]))  # cyclic: the next cycle starts over
    if count > 1:
        assert pairs == {(a, b): 1 for a in range(count) for b in range(count) if a != b}


def test_balanced_order_refuses_no_steps():
    with pytest.raises(ValueError, match="balanced_order: count must be >= 1"):
        balanced_order(0)


@pytest.mark.parametrize("count,repeats", [(1, 3), (2, 5), (3, 6), (3, 7), (4, 9)])
def test_time_interleaved_runs_each_step_after_each_other_equally_often(count, repeats):
    runs: list[str] = []
    names = [f"step{k}" for k in range(count)]
    steps = {name: (lambda name=name: runs.append(name)) for name in names}
    samples = time_interleaved(steps, torch.device("cpu"), repeats, warmup=1)
    assert {name: len(times) for name, times in samples.items()} == {name: repeats for name in names}
    assert all(t >= 0 for times in samples.values() for t in times)
    timed = runs[count:]  # after one warm-up run of each
    assert len(timed) == count * repeats
    if count == 1:
        return
    followers = Counter(zip(timed, timed[1:]))
    # Each ordered pair is adjacent once per whole cycle of count - 1 runs of each step;
    # the last, partial cycle adds at most one more of each.
    cycles = repeats // (count - 1)
    for a in names:
        for b in names:
            if a != b:
                assert cycles - 1 <= followers[(a, b)] <= cycles + 1
