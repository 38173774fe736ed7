"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention, the first
``first_k_dense_replace`` layers with a dense MLP, the rest sparse.

Sparse blocks route with sigmoid scores, group-limited top-k (``n_group`` /
``topk_group``), the ``e_score_correction_bias`` for selection only, optional
renormalisation and ``routed_scaling_factor`` (see ``shoal.moe.router``), plus
``n_shared_experts`` shared experts run as one MLP of ``n_shared_experts *
moe_intermediate_size``. Attention and its latent KV cache live in ``mla.py``; RoPE
(yarn included) covers ``qk_rope_head_dim`` dims, interleaved when ``rope_interleave``.
Multi-token-prediction layers in a checkpoint (``model.layers.<num_hidden_layers>``)
are skipped.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from shoal.models.llama import LayerBuild
from shoal.models.mla import MLAAttention, MLAKVCacheSpec
from shoal.models.moe_model import MoECausalLM, expert_impl_for
from shoal.moe.layer import MoEConfig
from shoal.moe.router import RouterConfig
from shoal.parallel.context import ParallelContext

_ATTN_NAME = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(.*)$")


class DeepseekV3ForCausalLM(MoECausalLM):
    """DeepSeek-V3 causal LM."""

    def __init__(
        self,
        config: Any,
        ctx: ParallelContext,
        dtype: torch.dtype = torch.float32,
        pp_layer_partition: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(config, ctx, dtype, pp_layer_partition)
        self.kv_cache_spec = MLAKVCacheSpec(  # type: ignore[assignment]
            num_layers=len(self.model.layers),
            latent_dim=config.kv_lora_rank + config.qk_rope_head_dim,
            dtype=dtype,
        )

    @classmethod
    def is_moe_layer(cls, config: Any, layer_idx: int) -> bool:
        return bool(config.n_routed_experts) and layer_idx >= config.first_k_dense_replace

    @classmethod
    def moe_config(cls, config: Any, ctx: ParallelContext) -> MoEConfig:
        router = RouterConfig(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            scoring="sigmoid",
            renormalize=bool(config.norm_topk_prob),
            n_group=config.n_group or 1,
            topk_group=config.topk_group or 1,
            routed_scaling_factor=float(config.routed_scaling_factor),
            correction_bias=True,
        )
        shared = (config.n_shared_experts or 0) * config.moe_intermediate_size
        return MoEConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.moe_intermediate_size,
            router=router,
            shared_intermediate_size=shared,
            activation=config.hidden_act,
            expert_impl=expert_impl_for(ctx),
        )

    @classmethod
    def make_attention(cls, build: LayerBuild, layer_idx: int) -> nn.Module:
        return MLAAttention(build.config, build.ctx, build.dtype, build.rotary)

    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        """Give each local layer its latent cache (``[pages, page_size, latent_dim]``)."""
        if len(caches) != len(self.model.layers):
            raise ValueError(
                f"got {len(caches)} KV cache tensors for {len(self.model.layers)} local layers"
            )
        latent = self.kv_cache_spec.latent_dim
        for layer, cache in zip(self.model.layers, caches):
            if cache.dim() != 3 or cache.shape[2] != latent:
                raise ValueError(
                    f"MLA cache of shape {tuple(cache.shape)} does not fit "
                    f"[pages, page_size, {latent}]"
                )
            layer.self_attn.kv_cache = cache

    def resolve_weight_name(self, name: str) -> tuple[str, Any] | None:
        match = _ATTN_NAME.match(name)
        if match:  # MLA names are not q/k/v shards of a fused matrix: no remapping
            idx = int(match.group(1))
            if not self.start_layer <= idx < self.end_layer:
                return None
            return f"model.layers.{idx - self.start_layer}.self_attn.{match.group(2)}", None
        return super().resolve_weight_name(name)
