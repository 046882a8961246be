"""make bench-scale's load shape and workloads (benchmarks/scale.py)."""

from __future__ import annotations

from collections import Counter

from benchmarks.scale import MAX_REPLICAS, RAMP, demand_at, workload


def test_the_ramp_goes_from_one_replica_to_all_and_back() -> None:
    assert demand_at(0) == 1
    peak = next(t for t, d in RAMP if d == MAX_REPLICAS)
    assert demand_at(peak) == MAX_REPLICAS
    assert 1 < demand_at(peak / 2) < MAX_REPLICAS
    assert demand_at(RAMP[-1][0] + 10) == 1


def test_workloads_uniform_and_with_hot_conversations() -> None:
    uniform = Counter(workload("uniform", 64, 4))
    assert set(uniform.values()) == {4} and len(uniform) == 64
    hot = Counter(workload("hot", 64, 4))
    assert sum(hot[c] for c in range(8)) / sum(hot.values()) > 0.4
    assert max(hot.values()) > 5 * (sum(hot[c] for c in range(8, 64)) / 56)
