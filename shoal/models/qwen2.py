"""Qwen2 (Qwen2ForCausalLM): the Llama layout with a bias on q, k and v (not on o_proj).

Sliding-window layers, when a config turns them on (``use_sliding_window`` with
``layer_types``), are handled by the shared attention; see ``llama.sliding_window_of``.
"""

from __future__ import annotations

from typing import Any

from shoal.models.llama import AttentionFlags, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 causal LM: Llama with q/k/v bias."""

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        return AttentionFlags(qkv_bias=True, o_bias=False)
