"""EPLB's worker half across two real gloo processes: physical slots, replicas, moves.

An MoE layer with physical slots (``use_physical_slots``) must compute what the plain
layer and the reference MoE compute, before and after its weights move between ranks
(``rearrange_layer``), for both expert-parallel dispatchers (tokens shared: dp = 1;
tokens per rank: all-to-all).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from shoal.moe.eplb import initial_phy2log, plan_moves, rearrange_layer
from shoal.moe.layer import MoEConfig, MoELayer
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext
from shoal.parallel.mesh import build_mesh
from tests.distributed.launcher import run_distributed
from tests.unit.test_moe_reference import load_layer, random_weights, reference_moe

pytestmark = pytest.mark.timeout(300)

H, INTER, E, TOP_K, REDUNDANT = 16, 8, 6, 3, 2  # 8 slots, 4 per rank


def _slots_hold_their_experts(layer: MoELayer, w: dict) -> bool:
    """Every local slot holds, bit for bit, the checkpoint weights of its logical expert."""
    ex = layer.experts
    for slot, e in enumerate(ex.logical_ids):
        want13 = torch.cat([w["w1"][e], w["w3"][e]])
        if not (torch.equal(ex.w13[slot], want13) and torch.equal(ex.w2[slot], w["w2"][e])):
            return False
    return True


def _check(ctx: ParallelContext) -> dict[str, float]:
    rank = ctx.rank
    shared_tokens = dataclasses.replace(ctx, enable_expert_parallel=True)  # ep = tp, dp = 1
    own_tokens = ParallelContext.from_initialized(build_mesh(2, 1, 1), rank, "cpu", True)
    w = random_weights(E, H, INTER, seed=3)
    cfg = MoEConfig(H, INTER, RouterConfig(E, TOP_K))
    out: dict[str, float] = {}
    for label, c in (("replicated-ep", shared_tokens), ("all-to-all", own_tokens)):
        plain, eplb = MoELayer(cfg, c), MoELayer(cfg, c)
        eplb.use_physical_slots(c, REDUNDANT)
        load_layer(plain, w)
        load_layer(eplb, w)
        seed = 50 + (rank if label == "all-to-all" else 0)
        x = torch.randn(13, H, generator=torch.Generator().manual_seed(seed))  # [T, H]
        ref = reference_moe(x, w["gate"], w["w1"], w["w3"], w["w2"], TOP_K)
        base = plain(x)
        old = initial_phy2log(E, E + REDUNDANT)
        placements = {
            "initial": None,
            # experts 0 and 5 get two replicas on different ranks (both ranks rewrite slots)
            "hot 0 and 5": [0, 1, 2, 5, 0, 3, 4, 5],
            # the ranks' halves swap: every slot moves, replica counts stay
            "swap ranks": [0, 3, 4, 5, 0, 1, 2, 5],
        }
        previous = base
        for name, phy2log in placements.items():
            if phy2log is not None:
                rearrange_layer(eplb, phy2log, c.ep)
                old = phy2log
            got = eplb(x)
            key = f"{label}/{name}"
            out[f"{key}/vs reference"] = (got - ref).abs().max().item()
            out[f"{key}/vs plain layer"] = (got - base).abs().max().item()
            out[f"{key}/weights"] = float(not _slots_hold_their_experts(eplb, w))
            out[f"{key}/map"] = float(eplb.slot_map.phy2log.tolist() != old)
            if name == "swap ranks" and label == "all-to-all":
                # every slot holds the same rows as before, and each token adds its experts
                # in k order: the move changes no bit of the output
                out[f"{key}/bitwise"] = float(not torch.equal(got, previous))
            previous = got
    own_tokens.close()
    return out


@pytest.mark.slow
def test_physical_slots_compute_the_same_before_and_after_moves() -> None:
    results = run_distributed(_check, 2, timeout_s=180)
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if v > 1e-5}
        assert not bad, f"rank {rank}: {bad}"
        assert len(errors) == 2 * 3 * 4 + 1, sorted(errors)


def test_moves_prefer_local_copies_and_spread_over_replicas() -> None:
    old = [0, 1, 2, 3, 0, 1, 2, 3]  # 4 experts, 8 slots, 2 ranks: each rank has all
    assert plan_moves(old, [0, 0, 2, 3, 0, 1, 2, 3], 2)[0].src_rank == 0  # local copy
    moves = plan_moves([0, 1, 2, 3, 4, 5, 0, 1], [4, 5, 2, 3, 0, 1, 2, 3], 2)
    # rank 1 copies experts 0 and 1 locally; 2, 3 come from rank 0 and 4, 5 go to it
    assert {(m.src_rank, m.dst_rank) for m in moves} == {(1, 0), (1, 1), (0, 1)}
    assert plan_moves(old, old, 2) == []


def _check_tp_inside_dp(ctx: ParallelContext) -> dict[str, float]:
    """dp2 x tp2 with EP over all four ranks: each tp rank maps and dispatches a slice of
    its dp rank's tokens, and the tp group gathers the combined rows."""
    ep = dataclasses.replace(ctx, enable_expert_parallel=True)
    w = random_weights(E, H, INTER, seed=4)
    cfg = MoEConfig(H, INTER, RouterConfig(E, TOP_K))
    layer = MoELayer(cfg, ep)
    layer.use_physical_slots(ep, 2)  # 8 slots, 2 per rank
    load_layer(layer, w)
    x = torch.randn(11, H, generator=torch.Generator().manual_seed(60 + ctx.dp.rank_in_group))
    ref = reference_moe(x, w["gate"], w["w1"], w["w3"], w["w2"], TOP_K)
    out = {"initial": (layer(x) - ref).abs().max().item()}
    rearrange_layer(layer, [5, 0, 5, 1, 2, 5, 3, 4], ep.ep)  # expert 5 on three ranks
    out["moved"] = (layer(x) - ref).abs().max().item()
    out["weights"] = float(not _slots_hold_their_experts(layer, w))
    return out


@pytest.mark.slow
def test_tp_inside_dp_splits_hot_experts_consistently() -> None:
    for rank, errors in enumerate(run_distributed(_check_tp_inside_dp, 4, dp=2, timeout_s=180)):
        bad = {k: v for k, v in errors.items() if v > 1e-5}
        assert not bad, f"rank {rank}: {bad}"
