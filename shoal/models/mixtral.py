"""Mixtral (MixtralForCausalLM): Llama/Mistral attention and a sparse MoE block in every layer.

The block is ``block_sparse_moe`` in checkpoints (experts ``experts.N.w1/w2/w3``:
gate, down, up). Routing: softmax over all experts, top-k, always renormalised
(``MixtralTopKRouter``). No shared expert.
"""

from __future__ import annotations

from typing import Any

from shoal.models.llama import AttentionFlags
from shoal.models.moe_model import MoECausalLM, expert_impl_for
from shoal.moe.layer import MoEConfig
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext


class MixtralForCausalLM(MoECausalLM):
    """Mixtral causal LM."""

    moe_prefix = "block_sparse_moe"

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        return AttentionFlags()

    @classmethod
    def moe_config(cls, config: Any, ctx: ParallelContext) -> MoEConfig:
        router = RouterConfig(
            num_experts=config.num_local_experts,
            top_k=config.num_experts_per_tok,
            scoring="softmax",
            renormalize=True,
        )
        return MoEConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            router=router,
            activation=config.hidden_act,
            expert_impl=expert_impl_for(ctx),
        )
