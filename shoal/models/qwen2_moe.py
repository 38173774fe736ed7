"""Qwen2-MoE (Qwen2MoeForCausalLM): Qwen2 attention (q/k/v bias) and a sparse block with a
sigmoid-gated shared expert.

Per layer: ``mlp.gate`` (router), ``mlp.experts.N.{gate,up,down}_proj``,
``mlp.shared_expert.{gate,up,down}_proj`` and ``mlp.shared_expert_gate`` (one output:
the shared expert's output is scaled by ``sigmoid(x @ w)``). Layers listed in
``mlp_only_layers``, or off the ``decoder_sparse_step`` grid, have a dense MLP of
``intermediate_size`` instead. Routing: softmax, top-k, renormalised only with
``norm_topk_prob``.
"""

from __future__ import annotations

from typing import Any

from shoal.models.llama import AttentionFlags
from shoal.models.moe_model import MoECausalLM, expert_impl_for
from shoal.moe.layer import MoEConfig
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext


def qwen_is_moe_layer(config: Any, layer_idx: int) -> bool:
    """Qwen2/Qwen3-MoE's rule for which layers are sparse."""
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer_idx not in mlp_only and config.num_experts > 0 and (layer_idx + 1) % step == 0


class Qwen2MoeForCausalLM(MoECausalLM):
    """Qwen2-MoE causal LM."""

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        return AttentionFlags(qkv_bias=bool(getattr(config, "qkv_bias", True)), o_bias=False)

    @classmethod
    def is_moe_layer(cls, config: Any, layer_idx: int) -> bool:
        return qwen_is_moe_layer(config, layer_idx)

    @classmethod
    def moe_config(cls, config: Any, ctx: ParallelContext) -> MoEConfig:
        router = RouterConfig(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            renormalize=bool(config.norm_topk_prob),
        )
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0  # Qwen3-MoE: none
        return MoEConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            router=router,
            shared_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            activation=config.hidden_act,
            expert_impl=expert_impl_for(ctx),
        )
