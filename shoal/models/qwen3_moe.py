"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (per-head q/k RMSNorm, explicit
``head_dim``) and a sparse block without shared experts.

Experts are ``mlp.experts.N.{gate,up,down}_proj``; the router ``mlp.gate``. Sparse
layers follow ``mlp_only_layers`` / ``decoder_sparse_step`` as in Qwen2-MoE. Routing:
softmax, top-k, renormalised with ``norm_topk_prob``.
"""

from __future__ import annotations

from typing import Any

from shoal.models.llama import AttentionFlags
from shoal.models.moe_model import MoECausalLM, expert_impl_for
from shoal.models.qwen2_moe import qwen_is_moe_layer
from shoal.moe.layer import MoEConfig
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext


class Qwen3MoeForCausalLM(MoECausalLM):
    """Qwen3-MoE causal LM."""

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionFlags(qkv_bias=bias, o_bias=bias, qk_norm=True)

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
        return MoEConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            router=router,
            activation=config.hidden_act,
            expert_impl=expert_impl_for(ctx),
        )
