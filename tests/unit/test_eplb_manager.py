"""EPLB in the engine core and at its edges: the manager's rebalance and one-layer moves,
slot alignment, the slot map's split by token index, options, the wire, /metrics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.comm.codec import decode, encode, pack_value, unpack_value
from shoal.config import EngineConfig, EPLBConfig
from shoal.engine.core_io import CoreStats
from shoal.engine.eplb import EPLBManager, align_slots, balancedness, initial_placement
from shoal.engine.plan import CachedRequests, DPStepPlan, StepPlan
from shoal.engine_args import engine_config
from shoal.moe.eplb import ExpertSlotMap, initial_phy2log
from shoal.serve.metrics import ServerMetrics

# two MoE layers, 8 experts; experts 6 and 7 take most tokens
SKEWED = np.array([[20, 20, 20, 20, 20, 20, 400, 300],
                   [30, 10, 10, 10, 10, 10, 300, 500]])


def empty_plan(step_id: int) -> StepPlan:
    return StepPlan(step_id, [], CachedRequests.from_rows([]), [], [], [])


def test_manager_rebalances_then_moves_one_layer_per_plan():
    manager = EPLBManager(EPLBConfig(enable_eplb=True, window_size=10, step_interval=3,
                                     num_redundant_experts=4), ep_size=2)
    start = initial_placement(2, 8, 12, 2)
    for _ in range(2):
        manager.record(SKEWED)
    assert manager.num_rebalances == 0
    assert np.array_equal(manager.placement.phy2log, start.phy2log)
    manager.record(None)  # a step without MoE work counts for nothing
    manager.record(SKEWED)  # the third: time to rebalance
    assert manager.num_rebalances == 1
    plans = [empty_plan(i) for i in range(3)]
    for plan in plans:
        manager.attach(plan)
    assert [p.expert_move.layer if p.expert_move else None for p in plans] == [0, 1, None]
    before = balancedness(start.rank_load(manager.window.load))
    after = balancedness(manager.rank_load)
    assert (after > before + 0.2).all() and (after > 0.9).all(), (before, after)
    assert (manager.placement.replica_counts[:, 6:] >= 2).all()
    moved = manager.num_slot_moves
    assert 0 < moved < 24  # kept experts stay in their slots
    # a fresh worker group starts from the initial placement again
    manager.reset()
    assert np.array_equal(manager.placement.phy2log, start.phy2log)


def test_moves_reach_every_dp_rank_and_cross_the_wire():
    manager = EPLBManager(EPLBConfig(enable_eplb=True, step_interval=1,
                                     num_redundant_experts=2), ep_size=2)
    manager.record(SKEWED)
    plan = DPStepPlan(0, [empty_plan(0), empty_plan(0)])
    manager.attach(plan)
    moves = [p.expert_move for p in plan.plans]
    assert moves[0] is not None and moves[0] is moves[1]
    back = decode(encode(plan))
    assert back.plans[1].expert_move.layer == moves[0].layer
    assert back.plans[1].expert_move.phy2log.tolist() == moves[0].phy2log.tolist()
    assert decode(encode(empty_plan(1))).expert_move is None


def test_align_keeps_what_stays_on_a_rank():
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    # rank 0 keeps 0 and 1, rank 1 keeps 4 and 5, in their slots; 4 slots move, not 6
    aligned = align_slots(old, np.array([[7, 6, 1, 0, 5, 4, 3, 2]]), 2)
    assert aligned.tolist() == [[0, 1, 6, 7, 4, 5, 2, 3]]
    assert align_slots(old, old[:, ::-1], 1).tolist() == old.tolist()  # one rank: nothing


def test_driver_and_workers_start_from_the_same_placement():
    assert initial_placement(1, 8, 12, 2).phy2log[0].tolist() == initial_phy2log(8, 12)


def test_slot_map_splits_a_hot_expert_by_token_index():
    slot_map = ExpertSlotMap([0, 1, 2, 1, 3, 1], num_experts=4)  # expert 1: slots 1, 3, 5
    ids = torch.tensor([[1, 0]] * 6)  # [T, K]: every token routes to expert 1 and 0
    slots = slot_map.route(ids)
    assert slots[:, 0].tolist() == [1, 3, 5, 1, 3, 5]
    assert slots[:, 1].tolist() == [0] * 6
    assert ExpertSlotMap([0, 1, 2, 1, 3, 1], 4, offset=1).route(ids)[:, 0].tolist()[:3] == [3, 5, 1]
    assert slot_map.route(torch.empty(0, 2, dtype=torch.int64)).shape == (0, 2)
    with pytest.raises(ValueError, match="no slot to experts \\[3\\]"):
        ExpertSlotMap([0, 1, 2, 2], 4)


def test_options_and_their_errors():
    config = engine_config({"enable_eplb": True, "data_parallel_size": 2,
                            "enable_expert_parallel": True,
                            "eplb_config": {"window_size": 8, "step_interval": 4,
                                            "num_redundant_experts": 2}})
    assert config.eplb == EPLBConfig(True, 8, 4, 2)
    assert EngineConfig.from_json(config.to_json()).eplb == config.eplb
    cases = {
        '{"window_size": 0}': "window_size must be a positive integer",
        '{"num_redundant_experts": -2}': "num_redundant_experts must be an integer >= 0",
        '{"step_interval": "often"}': "step_interval must be an integer",
        '{"windows": 3}': "unknown eplb_config keys \\['windows'\\]",
        "[1]": "must be a JSON object",
        "{": "not valid JSON",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=message):
            engine_config({"eplb_config": text})
    with pytest.raises(ValueError, match="needs expert parallelism"):
        engine_config({"enable_eplb": True, "data_parallel_size": 2})
    with pytest.raises(ValueError, match="pipeline_parallel_size > 1"):
        engine_config({"enable_eplb": True, "tp": 2, "pp": 2, "enable_expert_parallel": True})


def test_metrics_show_rank_load_and_balancedness():
    metrics = ServerMetrics("m")
    load = np.array([[300.0, 100.0], [200.0, 200.0]])  # [layers, ep ranks]
    stats = CoreStats(0, 0, 0.0, 10, 0, 0, 0, 5, eplb_rank_load=load, eplb_num_rebalances=2,
                      eplb_num_slot_moves=7)
    assert stats.eplb_balancedness.tolist() == [200 / 300, 1.0]
    wired = unpack_value(pack_value(stats), CoreStats)  # as the engine-core process sends it
    assert wired.eplb_rank_load.tolist() == load.tolist() and wired.eplb_num_slot_moves == 7
    metrics.engine_stats(stats)
    text = metrics.render().decode()
    assert 'shoal:eplb_rank_tokens{layer="0",model_name="m",rank="1"} 100.0' in text
    assert 'shoal:eplb_balancedness{layer="1",model_name="m"} 1.0' in text
    assert 'shoal:eplb_rebalances_total{model_name="m"} 2.0' in text
    assert 'shoal:eplb_moved_experts_total{model_name="m"} 7.0' in text
