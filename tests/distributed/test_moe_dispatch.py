"""MoE dispatchers across real gloo processes, against the single-process reference MoE.

One spawn per world size runs every check (each dispatcher, each routing case) and
returns the worst error per case, so the process start-up is paid once.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from shoal.moe.dispatcher import AllToAllEPDispatcher, ReplicatedEPDispatcher, TPExpertsDispatcher
from shoal.moe.experts import EXPERT_IMPLS
from shoal.moe.layer import MoEConfig, MoELayer
from shoal.moe.placement import ExpertPlacement
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext
from shoal.parallel.mesh import build_mesh
from tests.distributed.launcher import run_distributed
from tests.unit.test_moe_reference import random_weights, reference_moe

H, INTER = 16, 8


def _routing_cases(
    num_experts: int, top_k: int, owned_by_last: tuple[int, ...], rank: int, world: int
):
    """(name, tokens, ids, weights) for this rank; every rank draws the cases in one order."""
    gen = torch.Generator().manual_seed(100 + rank)

    def random_ids(num_tokens: int, allowed: list[int], k: int) -> torch.Tensor:
        rows = [
            torch.tensor(allowed)[torch.randperm(len(allowed), generator=gen)[:k]]
            for _ in range(num_tokens)
        ]
        return torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)

    def case(name: str, num_tokens: int, allowed: list[int], k: int = top_k):
        x = torch.randn(num_tokens, H, generator=gen)
        weights = torch.rand(num_tokens, k, generator=gen)
        return name, x, random_ids(num_tokens, allowed, k), weights

    everyone = list(range(num_experts))
    not_last = [e for e in everyone if e not in owned_by_last]
    return [
        case("random", 5 + 3 * rank, everyone),
        case("last rank receives nothing", 6, not_last),
        case("rank 0 sends nothing", 0 if rank == 0 else 4 + rank, everyone),
        case("no tokens anywhere", 0, everyone),
        case("all to one expert", 7, [num_experts - 1], k=1),
    ]


def _check_dispatchers(ctx: ParallelContext) -> dict[str, float]:
    """Runs on a tp = world mesh; a second, dp = world mesh gives ranks their own tokens."""
    rank, world = ctx.rank, ctx.tp_size
    errors: dict[str, float] = {}
    shared_tokens = dataclasses.replace(ctx, enable_expert_parallel=True)  # ep = tp, dp = 1
    own_tokens = ParallelContext.from_initialized(build_mesh(world, 1, 1), rank, "cpu", True)
    for num_experts, top_k, strategy in ((6, 2, "linear"), (6, 2, "round_robin"), (3, 2, "linear")):
        w = random_weights(num_experts, H, INTER, seed=num_experts)
        placement = ExpertPlacement(num_experts, world, strategy)
        dispatchers = {
            "tp": TPExpertsDispatcher(shared_tokens.tp, num_experts),
            "replicated-ep": ReplicatedEPDispatcher(shared_tokens.ep, placement),
            "all-to-all": AllToAllEPDispatcher(own_tokens.ep, placement),
        }
        last = placement.local_expert_ids(world - 1)
        for kind, dispatcher in dispatchers.items():
            # ranks that share tokens must draw the same ones: seed by rank 0 then
            case_rank = rank if kind == "all-to-all" else 0
            for impl in ("looped", "grouped"):
                experts = EXPERT_IMPLS[impl](
                    dispatcher.local_expert_ids, H, INTER, *dispatcher.expert_shard
                )
                for e in range(num_experts):
                    for proj, key in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                        experts.load_expert_weight(e, proj, w[key][e])
                for name, x, ids, weights in _routing_cases(
                    num_experts, top_k, last, case_rank, world
                ):
                    dispatched = dispatcher.dispatch(x, ids, weights)
                    out = dispatcher.reduce(
                        dispatcher.combine(
                            experts(dispatched.hidden, dispatched.tokens_per_expert), dispatched
                        )
                    )
                    ref = reference_moe(
                        x, w["gate"], w["w1"], w["w3"], w["w2"], top_k, routing=(ids, weights)
                    )
                    key = f"{kind}/{impl}/{num_experts}x{strategy}/{name}"
                    errors[key] = (
                        (out - ref).abs().max().item() if len(x) else float(out.shape != ref.shape)
                    )
    errors.update(_check_layers(rank, world, shared_tokens, own_tokens))
    own_tokens.close()
    return errors


def _check_layers(
    rank: int, world: int, shared_tokens: ParallelContext, own_tokens: ParallelContext
):
    """The whole MoELayer (real router, shared expert) under each dispatcher the context picks."""
    errors = {}
    E, top_k = 6, 2
    w = random_weights(E, H, INTER, seed=7)
    shared_w = random_weights(1, H, 12, seed=8)
    cfg = MoEConfig(
        H, INTER, RouterConfig(E, top_k), shared_intermediate_size=12, shared_expert_gate=True
    )
    no_ep = dataclasses.replace(shared_tokens, enable_expert_parallel=False)
    gate_vec = torch.randn(1, H, generator=torch.Generator().manual_seed(9))
    for label, ctx in (("tp", no_ep), ("replicated-ep", shared_tokens), ("all-to-all", own_tokens)):
        layer = MoELayer(cfg, ctx)
        assert type(layer.dispatcher).__name__.startswith(
            {"tp": "TPExperts", "replicated-ep": "ReplicatedEP", "all-to-all": "AllToAll"}[label]
        )
        layer.load_weight("gate.weight", w["gate"])
        for e in range(E):
            if layer.resolve(f"experts.{e}.w1.weight") is not None:
                for proj in ("w1", "w2", "w3"):
                    assert layer.load_weight(f"experts.{e}.{proj}.weight", w[proj][e])
        for proj, key in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            layer.load_weight(f"shared_expert.{proj}.weight", shared_w[key][0])
        layer.load_weight("shared_expert_gate.weight", gate_vec)
        seed = 200 + (rank if label == "all-to-all" else 0)
        num_tokens = 0 if (label == "all-to-all" and rank == 1) else 9
        x = torch.randn(num_tokens, H, generator=torch.Generator().manual_seed(seed))
        shared = reference_moe(
            x,
            torch.zeros(1, H),
            shared_w["w1"],
            shared_w["w3"],
            shared_w["w2"],
            1,
            routing=(torch.zeros(num_tokens, 1, dtype=torch.int64), torch.ones(num_tokens, 1)),
        )
        ref = (
            reference_moe(x, w["gate"], w["w1"], w["w3"], w["w2"], top_k)
            + torch.sigmoid(x @ gate_vec.T) * shared
        )
        out = layer(x)
        errors[f"layer/{label}"] = (
            (out - ref).abs().max().item() if num_tokens else float(out.shape != (0, H))
        )
        errors[f"layer/{label}/counts"] = float(
            int(layer.expert_counts.sum()) != num_tokens * top_k
        )
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_dispatchers_match_reference(world: int) -> None:
    results = run_distributed(_check_dispatchers, world, timeout_s=300)
    for rank, errors in enumerate(results):
        bad = {k: v for k, v in errors.items() if v > 1e-5}
        assert not bad, f"rank {rank}: {bad}"
        assert len(errors) == 3 * 3 * 2 * 5 + 6
