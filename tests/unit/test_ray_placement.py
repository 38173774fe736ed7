"""Which placement groups can never fit a cluster (pure: node resources in, reason out)."""
from __future__ import annotations

import pytest

from shoal.config import ParallelConfig
from shoal.engine_args import engine_config
from shoal.executor.ray_placement import infeasibility, placement_message

TWO_CPU = [{"CPU": 2.0, "memory": 1e10, "node:127.0.0.1": 1.0}]
TWO_NODES = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]


def test_bundles_that_fit_are_feasible():
    assert infeasibility([{"CPU": 0.5}] * 3, "PACK", TWO_CPU) is None
    assert infeasibility([{"CPU": 1.0}] * 4, "PACK", TWO_NODES) is None
    assert infeasibility([{"CPU": 1.0}] * 2, "STRICT_SPREAD", TWO_NODES) is None


def test_more_than_the_cluster_has_is_named():
    reason = infeasibility([{"CPU": 1.0}] * 3, "PACK", TWO_CPU)
    assert reason == "they need CPU 3 in total but the cluster has 2"
    assert "need GPU 2" in infeasibility([{"GPU": 1.0}] * 2, "PACK", TWO_NODES)


def test_a_bundle_bigger_than_any_node_and_strict_strategies():
    assert "bundle 0 {CPU: 3} fits on no single node" in infeasibility(
        [{"CPU": 3.0}], "PACK", TWO_NODES)
    assert "STRICT_PACK needs one node" in infeasibility([{"CPU": 1.0}] * 3, "STRICT_PACK",
                                                          TWO_NODES)
    assert "STRICT_SPREAD needs 3 nodes" in infeasibility([{"CPU": 1.0}] * 3, "STRICT_SPREAD",
                                                           TWO_NODES)
    assert infeasibility([{"CPU": 1.0}], "PACK", []) == "the cluster has no alive nodes"


def test_the_message_says_what_was_asked_and_what_exists():
    message = placement_message([{"CPU": 1.0}] * 3, "PACK", "why", TWO_CPU,
                                {"CPU": 1.5, "CPU_group_ab12": 0.5}, "Fix: this.")
    assert message == ("Ray cannot place 3 bundles [{CPU: 1}, {CPU: 1}, {CPU: 1}] (PACK): why. "
                       "Cluster: 1 node(s) ['{CPU: 2}'], free now {CPU: 1.5}. Fix: this.")


def test_placement_options_are_engine_options():
    config = engine_config({"placement-timeout": "5", "num_cpus_per_worker": 0.25})
    assert config.parallel.placement_timeout_s == 5.0
    assert config.parallel.num_cpus_per_worker == 0.25
    with pytest.raises(ValueError, match="num_cpus_per_worker must be a positive number"):
        ParallelConfig(num_cpus_per_worker=0)
    with pytest.raises(ValueError, match="placement_timeout must be positive"):
        ParallelConfig(placement_timeout_s=-1.0)
