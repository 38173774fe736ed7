"""Single-process MoE checks: a tiny gpt-fast-style reference MoE is the oracle for the
layer's parts, and transformers' own routers and sparse blocks are the oracle for the
arithmetic of each family.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.moe.experts import GroupedExperts, LoopedExperts
from shoal.moe.layer import MoEConfig, MoELayer
from shoal.moe.placement import ExpertPlacement
from shoal.moe.router import RouterConfig, TopKRouter
from shoal.parallel.context import ParallelContext


# --- the reference (after gpt-fast's MOEFeedForward) --------------------------------------------
# T tokens, H hidden, E experts, I expert intermediate size, A activated experts per token
def reference_moe(
    x: torch.Tensor,  # [T, H]
    gate: torch.Tensor,  # [E, H] router
    w1: torch.Tensor,  # [E, I, H] gate_proj
    w3: torch.Tensor,  # [E, I, H] up_proj
    w2: torch.Tensor,  # [E, H, I] down_proj
    top_k: int,
    renormalize: bool = True,
    routing: tuple[torch.Tensor, torch.Tensor] | None = None,  # forced (ids, weights), [T, A] each
) -> torch.Tensor:
    if routing is None:
        scores = F.softmax(x @ gate.T, dim=-1)  # [T, E]
        weights, ids = torch.topk(scores, top_k, dim=-1)  # [T, A]
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    else:
        ids, weights = routing
    x1 = F.silu(torch.einsum("th,taih->tai", x, w1[ids]))  # [T, A, I]
    x3 = torch.einsum("th,taih->tai", x, w3[ids])  # [T, A, I]
    expert_outs = torch.einsum("tai,tahi->tah", x1 * x3, w2[ids])  # [T, A, H]
    return torch.einsum("tah,ta->th", expert_outs, weights)  # [T, H]


def random_weights(
    num_experts: int, hidden: int, inter: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    return {
        "gate": rnd(num_experts, hidden),
        "w1": rnd(num_experts, inter, hidden),
        "w3": rnd(num_experts, inter, hidden),
        "w2": rnd(num_experts, hidden, inter),
    }


def load_layer(layer: MoELayer, w: dict[str, torch.Tensor]) -> None:
    layer.load_weight("gate.weight", w["gate"])
    for e in range(w["w1"].shape[0]):
        for proj in ("w1", "w2", "w3"):
            layer.load_weight(f"experts.{e}.{proj}.weight", w[proj][e])


# --- router against transformers ------------------------------------------------------------------


def _same_routing(ids_a, w_a, ids_b, w_b) -> None:
    order_a, order_b = ids_a.sort(dim=-1)[1], ids_b.sort(dim=-1)[1]
    assert torch.equal(ids_a.gather(1, order_a), ids_b.gather(1, order_b))
    torch.testing.assert_close(w_a.gather(1, order_a), w_b.gather(1, order_b), rtol=0, atol=0)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_router_matches_qwen2_moe(norm: bool) -> None:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    hf = Qwen2MoeTopKRouter(
        Qwen2MoeConfig(hidden_size=16, num_experts=6, num_experts_per_tok=2, norm_topk_prob=norm)
    )
    torch.nn.init.normal_(hf.weight)
    ours = TopKRouter(RouterConfig(6, 2, renormalize=norm), 16)
    ours.weight.data.copy_(hf.weight)
    x = torch.randn(11, 16)
    _, w_ref, ids_ref = hf(x)
    r = ours(x)
    _same_routing(r.topk_ids, r.topk_weights, ids_ref, w_ref)


def test_sigmoid_grouped_router_matches_deepseek_v3() -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(
        hidden_size=16,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    )
    hf = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(hf.weight)
    hf.e_score_correction_bias.copy_(torch.randn(8) * 0.5)  # large enough to change choices
    ours = TopKRouter(RouterConfig(8, 3, "sigmoid", True, 4, 2, 2.5, correction_bias=True), 16)
    ours.load_state_dict(
        {"weight": hf.weight, "e_score_correction_bias": hf.e_score_correction_bias}
    )
    x = torch.randn(40, 16)
    _, w_ref, ids_ref = hf(x)
    r = ours(x)
    _same_routing(r.topk_ids, r.topk_weights, ids_ref, w_ref)
    # the bias must change some choice, else this test would not test it
    plain = TopKRouter(RouterConfig(8, 3, "sigmoid", True, 4, 2, 2.5), 16)
    plain.weight.data.copy_(hf.weight)
    assert not torch.equal(plain(x).topk_ids.sort(-1)[0], r.topk_ids.sort(-1)[0])


# --- placement ---------------------------------------------------------------------------------


def test_placement_uneven_linear_and_round_robin() -> None:
    lin = ExpertPlacement(6, 4, "linear")
    assert [lin.local_expert_ids(r) for r in range(4)] == [(0, 1), (2, 3), (4,), (5,)]
    rr = ExpertPlacement(6, 4, "round_robin")
    assert [rr.local_expert_ids(r) for r in range(4)] == [(0, 4), (1, 5), (2,), (3,)]
    assert rr.global_to_local_map(1).tolist() == [-1, 0, -1, -1, -1, 1]
    assert rr.owner(4) == 0 and rr.local_index(5) == 1 and rr.max_local_experts == 2
    for p in (lin, rr):
        owned = sorted(e for r in range(4) for e in p.local_expert_ids(r))
        assert owned == list(range(6))
    assert ExpertPlacement(3, 4).counts == (1, 1, 1, 0)
    with pytest.raises(ValueError, match="strategy"):
        ExpertPlacement(4, 2, "random")


# --- experts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [LoopedExperts, GroupedExperts])
def test_experts_sharded_sum_to_whole(impl) -> None:
    E, H, inter = 4, 16, 12
    w = random_weights(E, H, inter)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(counts.sum()), H)
    ids = torch.repeat_interleave(torch.arange(E), counts)
    expected = reference_moe(
        x, w["gate"], w["w1"], w["w3"], w["w2"], 1, routing=(ids[:, None], torch.ones(len(ids), 1))
    )
    total = torch.zeros_like(x)
    for rank in range(3):  # 12 / 3, and shards of 4 floats keep grouped_mm's 16-byte strides
        ex = impl(range(E), H, inter, shard_size=3, shard_rank=rank)
        for e in range(E):
            for proj, key in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
                assert ex.load_expert_weight(e, proj, w[key][e])
        total += ex(x, counts)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)
    assert not impl([1, 3], H, inter).load_expert_weight(0, "gate", w["w1"][0])


def test_grouped_falls_back_on_unaligned_strides() -> None:
    ex = GroupedExperts(range(2), 5, 3)  # 3 and 5 floats: not 16-byte strides
    x = torch.randn(4, 5)
    out = ex(x, torch.tensor([1, 3]))
    assert out.shape == (4, 5)


# --- the whole layer ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["looped", "grouped"])
@pytest.mark.parametrize("top_k,renorm", [(2, True), (1, False), (3, False)])
def test_layer_matches_reference(impl: str, top_k: int, renorm: bool) -> None:
    E, H, inter = 6, 16, 8
    w = random_weights(E, H, inter, seed=top_k)
    cfg = MoEConfig(H, inter, RouterConfig(E, top_k, renormalize=renorm), expert_impl=impl)
    layer = MoELayer(cfg, ParallelContext.single())
    load_layer(layer, w)
    x = torch.randn(9, H)
    expected = reference_moe(x, w["gate"], w["w1"], w["w3"], w["w2"], top_k, renorm)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert int(layer.expert_counts.sum()) == 9 * top_k
    assert (
        int(layer.reset_expert_counts().sum()) == 9 * top_k and int(layer.expert_counts.sum()) == 0
    )
    assert layer(x[:0]).shape == (0, H)  # no tokens at all


def _per_expert(fused_gate_up: torch.Tensor, down: torch.Tensor, e: int) -> dict[str, torch.Tensor]:
    inter = down.shape[-1]
    return {"gate": fused_gate_up[e, :inter], "up": fused_gate_up[e, inter:], "down": down[e]}


def _load_from_hf_block(layer: MoELayer, hf_block, shared_name: str | None) -> None:
    sd = hf_block.state_dict()
    layer.load_weight("gate.weight", sd["gate.weight"])
    if "gate.e_score_correction_bias" in sd:
        layer.load_weight("gate.e_score_correction_bias", sd["gate.e_score_correction_bias"])
    for e in range(sd["experts.gate_up_proj"].shape[0]):
        for proj, t in _per_expert(sd["experts.gate_up_proj"], sd["experts.down_proj"], e).items():
            layer.load_weight(f"experts.{e}.{proj}_proj.weight", t)
    if shared_name:
        for proj in ("gate", "up", "down"):
            layer.load_weight(
                f"{shared_name}.{proj}_proj.weight", sd[f"{shared_name}.{proj}_proj.weight"]
            )
    if "shared_expert_gate.weight" in sd:
        layer.load_weight("shared_expert_gate.weight", sd["shared_expert_gate.weight"])


def _init_hf(block) -> None:
    g = torch.Generator().manual_seed(1)
    for p in block.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_layer_matches_transformers_qwen2_moe_block() -> None:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hcfg = Qwen2MoeConfig(
        hidden_size=16,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=12,
        norm_topk_prob=False,
    )
    hcfg._experts_implementation = "eager"
    hf = Qwen2MoeSparseMoeBlock(hcfg)
    _init_hf(hf)
    cfg = MoEConfig(
        16,
        8,
        RouterConfig(6, 2, renormalize=False),
        shared_intermediate_size=12,
        shared_expert_gate=True,
    )
    layer = MoELayer(cfg, ParallelContext.single())
    _load_from_hf_block(layer, hf, "shared_expert")
    x = torch.randn(1, 7, 16)
    torch.testing.assert_close(layer(x[0]), hf(x)[0], rtol=1e-5, atol=1e-5)


def test_layer_matches_transformers_deepseek_v3_block() -> None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hcfg = DeepseekV3Config(
        hidden_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        moe_intermediate_size=8,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
    )
    hcfg._experts_implementation = "eager"
    hf = DeepseekV3MoE(hcfg)
    _init_hf(hf)
    hf.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.3)
    cfg = MoEConfig(
        16,
        8,
        RouterConfig(8, 2, "sigmoid", True, 2, 1, 2.5, correction_bias=True),
        shared_intermediate_size=16,
    )
    layer = MoELayer(cfg, ParallelContext.single())
    _load_from_hf_block(layer, hf, "shared_experts")
    x = torch.randn(1, 7, 16)
    torch.testing.assert_close(layer(x[0]), hf(x)[0], rtol=1e-5, atol=1e-5)


def test_layer_rejects_unknown_weight_and_skips_foreign_experts() -> None:
    cfg = MoEConfig(8, 4, RouterConfig(4, 2))
    layer = MoELayer(cfg, ParallelContext.single())
    assert layer.resolve("experts.3.w2.weight") == ("experts.w2", (3, "down"))
    assert layer.resolve("experts.1.gate_proj.weight") == ("experts.w13", (1, "gate"))
    with pytest.raises(ValueError, match="no weight"):
        layer.load_weight("experts.0.w9.weight", torch.zeros(1))
