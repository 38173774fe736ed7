"""Qwen3 (Qwen3ForCausalLM): the Llama layout with RMSNorm over each q and k head
before RoPE, an explicit ``head_dim`` (not hidden / heads) and optional attention bias.
"""

from __future__ import annotations

from typing import Any

from shoal.models.llama import AttentionFlags, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 causal LM: Llama with per-head q/k RMSNorm."""

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionFlags(qkv_bias=bias, o_bias=bias, qk_norm=True)
