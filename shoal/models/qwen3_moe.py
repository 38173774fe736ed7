"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (per-head q/k RMSNorm, explicit
``head_dim``) and a sparse block without shared experts.

Experts are ``mlp.experts.N.{gate,up,down}_proj``; the router ``mlp.gate``. Sparse
layers follow ``mlp_only_layers`` / ``decoder_sparse_step`` as in Qwen2-MoE. Routing:
softmax, top-k, renormalised with ``norm_topk_prob``.
"""

from __future__ import annotations

from typing import Any

from shoal.models.llama import AttentionFlags
from shoal.models.qwen2_moe import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen3-MoE causal LM: Qwen2-MoE's sparse layers (no shared expert in its configs)."""

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionFlags(qkv_bias=bias, o_bias=bias, qk_norm=True)
