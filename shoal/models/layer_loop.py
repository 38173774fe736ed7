"""A Llama-layout model's decoder layers in one C++ call (``shoal::decoder_layers``).

The eager forward of one layer is some fifteen Python-level calls (modules, linears,
the fused kernels, views); at a small model's decode step those calls cost about as
much as the attention itself. :class:`LayerLoop` hands every layer's weights, caches
and flags to ``csrc/fused_ops.cpp`` once per step, which runs the same ops in the same
order as the modules (same kernels, so the same numbers) without returning to Python.

It applies where the modules would run exactly those ops: CPU, the C++ kernels built,
tp = 1 (no collectives between the ops), every layer a plain Llama decoder layer
(Llama, Mistral, SmolLM2, Qwen2, Qwen3; not MoE or MLA) with a SiLU MLP, no forward
hooks on them (a KV connector's per-layer hooks), outside ``torch.compile`` (the caller
checks), and RoPE
whose table does not depend on the step (``dynamic`` beyond its original length does).
Elsewhere the modules' own forward runs. Built lazily after the KV cache is bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal.models.attention import AttentionMetadata
from shoal.models.ops import fused
from shoal.models.ops.paged_attention import kernel_available
from shoal.models.rope import RotaryEmbedding

logger = logging.getLogger(__name__)


def _weight(linear: nn.Module) -> torch.Tensor:
    packed = getattr(linear, "packed_weight", None)
    return linear.weight if packed is None else packed


def _blocker(model: nn.Module, layer_types: tuple[type, type, type]) -> str | None:
    """Why ``model``'s layers cannot run as one loop (None: they can)."""
    decoder_cls, attention_cls, mlp_cls = layer_types
    layers = list(model.model.layers)
    if model.ctx.tp.size != 1:
        return "tensor parallelism reduces between the ops"
    if not layers or next(model.parameters()).device.type != "cpu":
        return "not a CPU model with layers"
    if not (fused.fused_ops_available() and kernel_available()):
        return "the C++ kernels are not available"
    for layer in layers:
        if (type(layer) is not decoder_cls or type(layer.self_attn) is not attention_cls
                or type(layer.mlp) is not mlp_cls):
            return f"{type(layer).__name__} is not a plain Llama decoder layer"
        if not layer.mlp.silu:
            return "the MLP's activation is not SiLU"
        attn = layer.self_attn.attn
        if attn.kv_cache is None or attn.use_kernel is False:
            return "a layer has no KV cache or runs the reference attention"
        if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
            return "a layer has forward hooks (a KV connector)"
    first = layers[0].self_attn
    norms = [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                             layer.self_attn.q_norm, layer.self_attn.k_norm)
             if n is not None]
    if len({n.eps for n in norms}) != 1:
        return "the layers' RMSNorms differ in eps"
    if any(layer.self_attn.rotary_emb is not first.rotary_emb
           or layer.self_attn.attn.scale != first.attn.scale for layer in layers):
        return "the layers differ in RoPE or softmax scale"
    linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if len({getattr(m, "packed_weight", None) is None for m in linears}) != 1:
        return "some linears are prepacked and some are not"
    return None


@dataclass
class LayerLoop:
    """Everything ``shoal::decoder_layers`` takes besides one step's tensors."""

    lists: tuple  # per-layer weights, biases, norms, caches and windows, in schema order
    rotary: RotaryEmbedding
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    eps: float
    packed: bool

    @classmethod
    def build(cls, model: nn.Module, layer_types: tuple[type, type, type]) -> LayerLoop | None:
        """The loop over ``model.model.layers``, or None (the reason logged) where the
        modules must run themselves; ``layer_types``: decoder, attention and MLP classes."""
        reason = _blocker(model, layer_types)
        if reason is not None:
            logger.debug("decoder layers run as modules: %s", reason)
            return None
        layers = list(model.model.layers)
        attns = [layer.self_attn for layer in layers]
        mlps = [layer.mlp for layer in layers]
        lists = (
            [layer.input_layernorm.weight for layer in layers],
            [layer.post_attention_layernorm.weight for layer in layers],
            [_weight(a.qkv_proj) for a in attns],
            [a.qkv_proj.bias for a in attns],
            [_weight(a.o_proj) for a in attns],
            [a.o_proj.bias for a in attns],
            [_weight(m.gate_up_proj) for m in mlps],
            [m.gate_up_proj.bias for m in mlps],
            [_weight(m.down_proj) for m in mlps],
            [m.down_proj.bias for m in mlps],
            [None if a.q_norm is None else a.q_norm.weight for a in attns],
            [None if a.k_norm is None else a.k_norm.weight for a in attns],
            [a.attn.kv_cache[0] for a in attns],
            [a.attn.kv_cache[1] for a in attns],
            [a.attn.sliding_window or 0 for a in attns],
        )
        first = attns[0]
        return cls(lists=lists, rotary=first.rotary_emb, num_heads=first.attn.num_heads,
                   num_kv_heads=first.attn.num_kv_heads, head_dim=first.head_dim,
                   scale=first.attn.scale, eps=layers[0].input_layernorm.eps,
                   packed=getattr(first.qkv_proj, "packed_weight", None) is not None)

    def runs(self, meta: Any, hidden: torch.Tensor) -> bool:
        """Whether this step goes through the loop (else through the modules)."""
        if not isinstance(meta, AttentionMetadata) or hidden.shape[0] == 0:
            return False
        return self.rotary.static_table(meta.max_context_len)

    def __call__(self, positions: torch.Tensor, hidden: torch.Tensor,
                 residual: torch.Tensor | None,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        self.rotary.ensure(meta.max_context_len)
        return torch.ops.shoal.decoder_layers(
            hidden, residual, positions, self.rotary._cos, self.rotary._sin, *self.lists,
            meta.slot_mapping, meta.page_table, meta.query_start, meta.context_lens,
            self.num_heads, self.num_kv_heads, self.head_dim, self.scale, self.eps, self.packed)
