"""Splits of dimensions, attention heads and pipeline layers (pure functions)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.parallel.partition import partition_heads, split_range, split_sizes, valid_tp_sizes
from shoal.parallel.pipeline import partition_layers


def test_split_sizes_even_and_uneven():
    assert split_sizes(8, 2) == [4, 4]
    assert split_sizes(211, 4) == [53, 53, 53, 52]
    assert split_sizes(2, 4) == [1, 1, 0, 0]
    assert split_range(211, 4, 3) == (159, 211)
    with pytest.raises(ValueError):
        split_sizes(4, 0)


@given(st.integers(0, 500), st.integers(1, 16))
def test_split_ranges_tile_the_dimension(total, parts):
    sizes = split_sizes(total, parts)
    assert sum(sizes) == total and max(sizes) - min(sizes) <= 1
    ranges = [split_range(total, parts, i) for i in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_smollm2_heads_on_two_ranks():
    r0, r1 = (partition_heads(9, 3, 2, r) for r in range(2))
    assert (r0.q_start, r0.q_end, r0.kv_start, r0.kv_end) == (0, 6, 0, 2)
    assert (r1.q_start, r1.q_end, r1.kv_start, r1.kv_end) == (6, 9, 2, 3)
    assert r0.q_sizes == (6, 3) and r0.kv_sizes == (2, 1)


def test_six_heads_three_kv_on_two_ranks():
    r0, r1 = (partition_heads(6, 3, 2, r) for r in range(2))
    assert (r0.num_local_heads, r0.num_local_kv_heads) == (4, 2)
    assert (r1.q_start, r1.q_end, r1.kv_start, r1.kv_end) == (4, 6, 2, 3)


def test_kv_heads_replicated_when_tp_exceeds_them():
    parts = [partition_heads(8, 2, 4, r) for r in range(4)]
    assert [p.kv_start for p in parts] == [0, 0, 1, 1]  # rank r holds kv head r // 2
    assert [(p.q_start, p.q_end) for p in parts] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert parts[0].kv_replicas == 2
    # a group of 3 query heads shared by 2 replicas splits 2 / 1
    uneven = [partition_heads(6, 2, 4, r) for r in range(4)]
    assert [(p.q_start, p.q_end) for p in uneven] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    single_kv = [partition_heads(4, 1, 2, r) for r in range(2)]
    assert [(p.q_start, p.q_end, p.kv_start) for p in single_kv] == [(0, 2, 0), (2, 4, 0)]


def test_impossible_tp_size_names_the_ones_that_work():
    with pytest.raises(ValueError, match=r"sizes that work: \[1, 2, 3, 6, 9\]"):
        partition_heads(9, 3, 4, 0)
    assert valid_tp_sizes(8, 2) == [1, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="multiple"):
        partition_heads(9, 2, 1, 0)


@given(st.integers(1, 8), st.integers(1, 6), st.integers(1, 16))
def test_every_query_head_is_owned_once_with_its_kv_head(kv, group, tp):
    heads = kv * group
    if tp not in valid_tp_sizes(heads, kv):
        with pytest.raises(ValueError):
            partition_heads(heads, kv, tp, 0)
        return
    owned = []
    for r in range(tp):
        p = partition_heads(heads, kv, tp, r)
        assert p.num_local_heads >= 1 and p.num_local_kv_heads >= 1
        for h in range(p.q_start, p.q_end):
            assert p.kv_start <= h // group < p.kv_end  # the rank holds this head's KV head
        owned.extend(range(p.q_start, p.q_end))
    assert owned == list(range(heads))


def test_partition_layers():
    assert partition_layers(4, 2) == [(0, 2), (2, 4)]
    assert partition_layers(5, 2) == [(0, 3), (3, 5)]
    assert partition_layers(7, 3) == [(0, 2), (2, 5), (5, 7)]  # extras before the last stage
    assert partition_layers(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert partition_layers(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    assert partition_layers(30, 1) == [(0, 30)]
    assert partition_layers(5, 2, [1, 4]) == [(0, 1), (1, 5)]
    with pytest.raises(ValueError, match="summing"):
        partition_layers(5, 2, [2, 2])
    with pytest.raises(ValueError, match="at most 2"):
        partition_layers(2, 3)
