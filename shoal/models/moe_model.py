"""What every Mixture-of-Experts family shares: a decoder layer whose MLP may be an
:class:`~shoal.moe.layer.MoELayer`, and a causal LM that routes checkpoint names of
the MoE block to it.

Built on the Llama layout (``llama.py``): attention, norms, embedding, LM head,
pipeline stages and the sharded loader are reused as they are. A family says

* which layers are sparse (``is_moe_layer``) and how its config maps to a
  :class:`~shoal.moe.layer.MoEConfig` (``moe_config``);
* the name of the block in its checkpoints (``moe_prefix``: ``block_sparse_moe``
  for Mixtral, ``mlp`` otherwise). In shoal the block is always ``mlp``.

Expert names never go through the dense name remapping: the MoE block resolves them
itself, and answers None for experts other ranks hold, so they are never read.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from shoal.models.llama import (
    DecoderLayer,
    LayerBuild,
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
)
from shoal.moe.layer import MoEConfig, MoELayer
from shoal.parallel.context import ParallelContext

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def expert_impl_for(ctx: ParallelContext) -> str:
    """Grouped GEMM on CUDA (it falls back to the loop where the kernel cannot run);
    the loop on CPU, where one matmul per expert is as fast and needs no aligned shapes."""
    return "grouped" if ctx.device.type == "cuda" else "looped"


class MoEDecoderLayer(DecoderLayer):
    """A decoder layer whose attention and MLP (dense or MoELayer) the family chooses."""

    def __init__(
        self,
        config: Any,
        layer_idx: int,
        ctx: ParallelContext,
        dtype: torch.dtype,
        attention: nn.Module,
        mlp: nn.Module,
    ) -> None:
        super().__init__(config, ctx, dtype, attention, mlp)
        self.layer_idx = layer_idx


class MoECausalLM(LlamaForCausalLM):
    """A Llama-layout causal LM whose sparse layers hold an MoELayer as ``mlp``."""

    moe_prefix = "mlp"

    @classmethod
    def moe_config(cls, config: Any, ctx: ParallelContext) -> MoEConfig:
        raise NotImplementedError

    @classmethod
    def is_moe_layer(cls, config: Any, layer_idx: int) -> bool:
        return True

    @classmethod
    def make_attention(cls, build: LayerBuild, layer_idx: int) -> nn.Module:
        return LlamaAttention(build, layer_idx)

    @classmethod
    def make_dense_mlp(cls, config: Any, ctx: ParallelContext, dtype: torch.dtype) -> nn.Module:
        return LlamaMLP(config, ctx, dtype)

    @classmethod
    def make_layer(cls, build: LayerBuild, layer_idx: int) -> nn.Module:
        config, ctx, dtype = build.config, build.ctx, build.dtype
        if cls.is_moe_layer(config, layer_idx):
            mlp: nn.Module = MoELayer(cls.moe_config(config, ctx), ctx, dtype)
        else:
            mlp = cls.make_dense_mlp(config, ctx, dtype)
        attention = cls.make_attention(build, layer_idx)
        return MoEDecoderLayer(config, layer_idx, ctx, dtype, attention, mlp)

    @property
    def moe_layers(self) -> dict[int, MoELayer]:
        """This stage's sparse blocks by global layer index; each has ``expert_counts``."""
        return {
            self.start_layer + i: layer.mlp
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, MoELayer)
        }

    def resolve_weight_name(self, name: str) -> tuple[str, Any] | None:
        match = _LAYER_NAME.match(name)
        prefix = self.moe_prefix + "."
        if match and match.group(2).startswith(prefix):
            idx = int(match.group(1))
            if not self.start_layer <= idx < self.end_layer:
                return None
            local = idx - self.start_layer
            block = self.model.layers[local].mlp
            if isinstance(block, MoELayer):
                target = block.resolve(match.group(2)[len(prefix) :])
                if target is None:
                    return None
                return f"model.layers.{local}.mlp.{target[0]}", target[1]
        return super().resolve_weight_name(name)
