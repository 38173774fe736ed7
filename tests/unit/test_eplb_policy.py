"""EPLB's driver half: the sliding load window, DeepSeek's placement, balancedness."""
from __future__ import annotations

import numpy as np
import pytest

from shoal.engine.eplb import (
    ExpertLoadWindow,
    balancedness,
    linear_placement,
    rebalance_experts,
)


def test_window_keeps_the_last_steps():
    window = ExpertLoadWindow(2)
    assert window.load is None
    for step in range(1, 5):
        window.add(np.full((1, 3), step))
        window.add(None)  # a step without MoE work changes nothing
    assert window.load.tolist() == [[7, 7, 7]]  # steps 3 and 4
    with pytest.raises(ValueError, match="window_size"):
        ExpertLoadWindow(0)


def test_skewed_router_gets_balanced_with_redundant_experts():
    # 8 experts on 4 ranks, two hot experts take most tokens, in both layers
    load = np.array([[900, 700, 50, 50, 50, 50, 50, 50],
                     [40, 40, 40, 40, 40, 40, 800, 1000]])
    before = balancedness(linear_placement(2, 8, 4).rank_load(load))
    placement = rebalance_experts(load, num_physical=12, ep_size=4)  # 4 redundant slots
    after = balancedness(placement.rank_load(load))
    # greedy packing (as DeepSeek's) is not optimal, but far better: 0.30 -> 0.81 here
    assert (before < 0.35).all() and (after > 0.75).all(), (before, after)
    for layer, hot in ((0, (0, 1)), (1, (6, 7))):
        assert placement.replica_counts[layer].sum() == 12
        assert all(placement.replica_counts[layer, e] >= 2 for e in hot)
        # every logical expert has a slot; every rank has the same number of slots
        assert set(placement.phy2log[layer].tolist()) == set(range(8))
    assert placement.slots_per_rank == 3
    # a rank never holds two replicas of one expert when it can be avoided here
    for layer in range(2):
        for rank in range(4):
            slots = placement.phy2log[layer, rank * 3 : (rank + 1) * 3].tolist()
            assert len(set(slots)) == len(slots), slots


def test_even_load_without_redundancy_stays_even():
    load = np.full((1, 8), 10)
    placement = rebalance_experts(load, num_physical=8, ep_size=4)
    assert balancedness(placement.rank_load(load)).tolist() == [1.0]


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="num_physical=6 is below"):
        rebalance_experts(np.ones((1, 8)), 6, 2)
    with pytest.raises(ValueError, match="do not divide over 4 ranks"):
        rebalance_experts(np.ones((1, 8)), 10, 4)
    assert balancedness(np.zeros((1, 4))).tolist() == [1.0]
