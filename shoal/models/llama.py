"""Llama family (LlamaForCausalLM, MistralForCausalLM, SmolLM2), tensor- and
pipeline-parallel, with paged attention.

Layout follows ``transformers.models.llama.modeling_llama`` so outputs match it; the
residual stream is carried beside the hidden states (vLLM's fused add + RMSNorm), which
is what a pipeline stage hands the next. q/k/v and gate/up are fused into one
column-parallel matrix each; checkpoint names are mapped in :meth:`load_weights`.
Qwen2 and Qwen3 reuse everything here with different :class:`AttentionFlags`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal.config import DTYPES
from shoal.models.attention import AttentionMetadata, PagedAttention, StepTensors
from shoal.models.kv_spec import KVCacheSpec
from shoal.models.layer_loop import LayerLoop
from shoal.models.ops import fused
from shoal.models.rope import RotaryEmbedding, rope_parameters
from shoal.moe.experts import ACTIVATIONS
from shoal.parallel.context import ParallelContext
from shoal.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from shoal.parallel.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
    new_parameter,
)
from shoal.parallel.loader import load_checkpoint, remap_stacked
from shoal.parallel.pipeline import IntermediateTensors, partition_layers

# torch dtype of each explicit ``ModelConfig.dtype`` name ("auto" is resolved per device)
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}
# (fused parameter fragment, checkpoint fragment, shard id)
STACKED_PARAMS = [
    (".qkv_proj", ".q_proj", "q"),
    (".qkv_proj", ".k_proj", "k"),
    (".qkv_proj", ".v_proj", "v"),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
]
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


@dataclass(frozen=True)
class AttentionFlags:
    """Where a family differs from Llama's attention block."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each q and k head before RoPE


@dataclass(frozen=True)
class LayerBuild:
    """What every layer of one model build shares: handed to the families' build hooks."""

    config: Any  # the HF config
    ctx: ParallelContext
    dtype: torch.dtype
    rotary: RotaryEmbedding
    flags: AttentionFlags


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: Any, layer_idx: int) -> int | None:
    """The layer's attention window as Hugging Face applies it (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    return window if layer_types[layer_idx] == "sliding_attention" else None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; with ``residual`` it adds first and returns both.

    On CPU the fused kernel does it in one call, writing the sum into ``residual`` and
    the normed rows into ``x`` (callers hand over both)."""

    def __init__(
        self, hidden_size: int, eps: float, ctx: ParallelContext, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.eps = eps
        self.weight = new_parameter((hidden_size,), ctx, dtype, default_weight_loader)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if fused.fused_ops_on(x):  # one C++ call (ops/fused.py); with residual, in place
            if residual is None and x.dim() in (2, 3):
                return fused.rms_norm(x, self.weight, self.eps)
            if residual is not None and x.dim() == 2 and x.is_contiguous() \
                    and residual.is_contiguous():
                return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)


class LlamaAttention(nn.Module):
    """Self-attention over this rank's heads; o_proj sums the ranks' partial outputs."""

    def __init__(self, build: LayerBuild, layer_idx: int) -> None:
        super().__init__()
        config, ctx, dtype, flags = build.config, build.ctx, build.dtype, build.flags
        hidden, hd = config.hidden_size, head_dim_of(config)
        self.head_dim = hd
        self.qkv_proj = QKVParallelLinear(
            hidden,
            hd,
            config.num_attention_heads,
            config.num_key_value_heads,
            ctx,
            bias=flags.qkv_bias,
            dtype=dtype,
        )
        part = self.qkv_proj.partition
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * hd,
            hidden,
            ctx,
            bias=flags.o_bias,
            dtype=dtype,
            input_range=(part.q_start * hd, part.q_end * hd),
        )
        self.q_norm = self.k_norm = None
        if flags.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, ctx, dtype)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, ctx, dtype)
        self.rotary_emb = build.rotary
        self.attn = PagedAttention(
            part.num_local_heads,
            part.num_local_kv_heads,
            hd,
            scale=hd**-0.5,
            sliding_window=sliding_window_of(config, layer_idx),
        )

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
            k = self.k_norm(k.reshape(num_tokens, -1, self.head_dim)).view(num_tokens, -1)
        q, k = self.rotary_emb(positions, q, k, meta)
        return self.o_proj(self.attn(q, k, v, meta))  # [T, hidden]


class LlamaMLP(nn.Module):
    """SwiGLU MLP; the intermediate size is split over tp (unevenly if need be)."""

    def __init__(self, config: Any, ctx: ParallelContext, dtype: torch.dtype) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {config.hidden_act!r} is not supported; "
                f"supported: {sorted(ACTIVATIONS)}"
            )
        bias = getattr(config, "mlp_bias", False)
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], ctx, bias=bias, dtype=dtype
        )
        start, end = self.gate_up_proj.ranges[0]
        self.local_inter = end - start
        self.down_proj = RowParallelLinear(
            inter, config.hidden_size, ctx, bias=bias, dtype=dtype, input_range=(start, end)
        )
        self.act = ACTIVATIONS[config.hidden_act]
        self.silu = config.hidden_act == "silu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 * local_inter]
        if self.silu and fused.fused_ops_on(gate_up):
            return self.down_proj(fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.local_inter, dim=-1)  # 2 x [T, local_inter]
        return self.down_proj(self.act(gate) * up)  # [T, hidden]


class DecoderLayer(nn.Module):
    """Pre-norm attention + MLP (dense or MoE), the residual carried beside the hidden states."""

    def __init__(self, config: Any, ctx: ParallelContext, dtype: torch.dtype,
                 attention: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ctx, dtype)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual  # [T, hidden]


class LlamaDecoderLayer(DecoderLayer):
    def __init__(self, build: LayerBuild, layer_idx: int) -> None:
        super().__init__(build.config, build.ctx, build.dtype,
                         LlamaAttention(build, layer_idx),
                         LlamaMLP(build.config, build.ctx, build.dtype))


class LlamaModel(nn.Module):
    """Embedding (first stage), layers ``[start, end)``, final norm (last stage)."""

    def __init__(
        self,
        config: Any,
        ctx: ParallelContext,
        dtype: torch.dtype,
        start: int,
        end: int,
        layer_factory: Callable[[int, RotaryEmbedding], nn.Module],
    ) -> None:
        super().__init__()
        self.embed_tokens = (
            VocabParallelEmbedding(config.vocab_size, config.hidden_size, ctx, dtype=dtype)
            if ctx.pp.is_first
            else None
        )
        rotary = RotaryEmbedding(
            head_dim_of(config),
            config.max_position_embeddings,
            rope_parameters(config),
            device=ctx.device,
        )
        self.layers = nn.ModuleList([layer_factory(i, rotary) for i in range(start, end)])
        self.norm = (
            RMSNorm(config.hidden_size, config.rms_norm_eps, ctx, dtype) if ctx.pp.is_last else None
        )


class LlamaForCausalLM(nn.Module):
    """Causal LM of the Llama layout; one pipeline stage and one tp shard of it."""

    def __init__(
        self,
        config: Any,
        ctx: ParallelContext,
        dtype: torch.dtype = torch.float32,
        pp_layer_partition: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if dtype not in TORCH_DTYPES.values():
            raise ValueError(f"dtype must be one of {tuple(TORCH_DTYPES.values())}, got {dtype}")
        self.config = config
        self.ctx = ctx
        self.dtype = dtype
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        ranges = partition_layers(config.num_hidden_layers, ctx.pp_size, pp_layer_partition)
        self.start_layer, self.end_layer = ranges[ctx.pp_rank]
        flags = self.attention_flags(config)
        self.model = LlamaModel(
            config,
            ctx,
            dtype,
            self.start_layer,
            self.end_layer,
            lambda i, rotary: self.make_layer(LayerBuild(config, ctx, dtype, rotary, flags), i),
        )
        self.lm_head = None
        if ctx.pp.is_last:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, ctx, dtype=dtype)
            if self.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.tie_to(self.model.embed_tokens)
        part = self.model.layers[0].self_attn.attn
        self.kv_cache_spec = KVCacheSpec(
            num_layers=len(self.model.layers),
            num_kv_heads=part.num_kv_heads,
            head_dim=part.head_dim,
            dtype=dtype,
        )
        self.loaded_bytes = 0
        self.compiled: Any = None  # a CompiledForward (shoal.models.compiled), or None
        # every layer in one C++ call where it applies (shoal.models.layer_loop); built on
        # the first forward after the KV cache is bound (False: not built yet)
        self._layer_loop: LayerLoop | None | bool = False

    @classmethod
    def attention_flags(cls, config: Any) -> AttentionFlags:
        bias = bool(getattr(config, "attention_bias", False))
        return AttentionFlags(qkv_bias=bias, o_bias=bias)

    @classmethod
    def make_layer(cls, build: LayerBuild, layer_idx: int) -> nn.Module:
        """One decoder layer; MoE families override this to put an MoE block in."""
        return LlamaDecoderLayer(build, layer_idx)

    def bind_kv_cache(self, caches: list[torch.Tensor]) -> None:
        """Give each local layer its cache tensor (from ``kv_cache_spec.allocate``)."""
        if len(caches) != len(self.model.layers):
            raise ValueError(
                f"got {len(caches)} KV cache tensors for {len(self.model.layers)} local layers"
            )
        for layer, cache in zip(self.model.layers, caches):
            attn = layer.self_attn.attn
            if (
                cache.dim() != 5
                or cache.shape[0] != 2
                or cache.shape[3:] != (attn.num_kv_heads, attn.head_dim)
            ):
                raise ValueError(
                    f"KV cache of shape {tuple(cache.shape)} does not fit "
                    f"[2, pages, page_size, {attn.num_kv_heads}, {attn.head_dim}]"
                )
            attn.kv_cache = cache
        self._layer_loop = False

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """[T] token ids (first stage) or the previous stage's tensors -> [T, hidden]
        normed hidden states (last stage) or IntermediateTensors (other stages).

        Runs compiled when :func:`shoal.models.compiled.compile_model` set it up."""
        if self.compiled is not None and isinstance(meta, AttentionMetadata):
            return self.compiled(input_ids, positions, meta, intermediate)
        return self.run_layers(input_ids, positions, meta, intermediate)

    def run_layers(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata | StepTensors,
        intermediate: IntermediateTensors | None = None,
    ) -> torch.Tensor | IntermediateTensors:
        """The eager body of :meth:`forward` (what the compiled forward traces)."""
        if self.model.embed_tokens is not None:
            hidden, residual = self.model.embed_tokens(input_ids), None  # [T, hidden]
        else:
            assert intermediate is not None, "a later pipeline stage needs intermediate tensors"
            hidden, residual = intermediate.hidden_states, intermediate.residual
        loop = None if torch.compiler.is_compiling() else self._layer_loop
        if loop is False:
            loop = self._layer_loop = LayerLoop.build(
                self, (LlamaDecoderLayer, LlamaAttention, LlamaMLP))
        if loop is not None and loop.runs(meta, hidden):
            hidden, residual = loop(positions, hidden, residual, meta)
        else:
            for layer in self.model.layers:
                hidden, residual = layer(positions, hidden, residual, meta)
        if self.model.norm is None:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits, full vocabulary on every tp rank."""
        if self.lm_head is None:
            raise RuntimeError("compute_logits runs on the last pipeline stage only")
        return self.lm_head(hidden)

    def resolve_weight_name(self, name: str) -> tuple[str, Any] | None:
        """Map a Hugging Face checkpoint name to (local parameter name, shard id)."""
        if "rotary_emb.inv_freq" in name:
            return None
        match = _LAYER_NAME.match(name)
        if match:
            idx = int(match.group(1))
            if not self.start_layer <= idx < self.end_layer:
                return None
            name = f"model.layers.{idx - self.start_layer}.{match.group(2)}"
            return remap_stacked(name, STACKED_PARAMS)
        if name == "model.embed_tokens.weight":
            if self.model.embed_tokens is not None:
                return name, None
            if self.tie_word_embeddings and self.lm_head is not None:
                return "lm_head.weight", None
            return None
        if name.startswith("lm_head."):
            if self.lm_head is None or self.tie_word_embeddings:
                return None
            return name, None
        if name.startswith("model.norm."):
            return (name, None) if self.model.norm is not None else None
        return name, None

    def load_weights(self, checkpoint_dir: str) -> None:
        """Read this rank's slices of the checkpoint; ``loaded_bytes`` counts what was read."""
        self.loaded_bytes = load_checkpoint(self, checkpoint_dir, self.resolve_weight_name)
