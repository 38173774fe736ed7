"""Multi-head latent attention (MLA, DeepSeek-V2/V3) with a paged cache of the latent.

Per token, MLA keeps one compressed vector instead of per-head keys and values:

    latent = RMSNorm(x W_kv_a[:kv_lora_rank])              [kv_lora_rank]
    k_rope = RoPE(x W_kv_a[kv_lora_rank:])                 [qk_rope_head_dim], shared by all heads
    k_nope, v = split(latent W_kv_b)                       per head: [qk_nope], [v_head_dim]
    k = [k_nope | k_rope],  q = [q_nope | RoPE(q_rope)]    per head: [qk_nope + qk_rope]

The queries come from ``x`` directly (``q_proj``) or through a low-rank bottleneck
(``q_a_proj`` -> RMSNorm -> ``q_b_proj``) when ``q_lora_rank`` is set. The cache stores
``[latent | k_rope]`` per token, so a page is ``[page_size, kv_lora_rank + qk_rope_head_dim]``
(:class:`MLAKVCacheSpec`), one tensor per layer. Heads are split over tp (``q_b_proj``/
``kv_b_proj`` by head rows, ``o_proj`` by head columns); the latent is the same for every
head, so every tp rank stores all of it.

On CPU the C++ paged kernel reads the cached latents in place with ``kv_b_proj``
absorbed into the query and the output (as vLLM's MLA decode does). The reference path
(CUDA, or no compiler) expands the cached latents through ``kv_b_proj`` into keys and
values each step, the arithmetic transformers uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shoal.models.attention import AttentionMetadata, StepTensors, use_kernel
from shoal.models.llama import RMSNorm
from shoal.models.ops.paged_attention import cached_attention
from shoal.models.rope import RotaryEmbedding, rope_parameters
from shoal.parallel.context import ParallelContext
from shoal.parallel.linear import (
    RowParallelLinear,
    copy_checked,
    default_weight_loader,
    new_parameter,
)
from shoal.parallel.partition import split_range


@dataclass(frozen=True)
class MLAKVCacheSpec:
    """MLA cache: per layer ``[pages, page_size, latent_dim]``, latent_dim = kv_lora_rank + rope."""

    num_layers: int
    latent_dim: int
    dtype: torch.dtype

    def page_shape(self, page_size: int) -> tuple[int, ...]:
        return (page_size, self.latent_dim)

    def bytes_per_page(self, page_size: int) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return page_size * self.latent_dim * elem * self.num_layers

    def allocate(
        self, num_pages: int, page_size: int, device: torch.device | str
    ) -> list[torch.Tensor]:
        if num_pages < 1 or page_size < 1:
            raise ValueError(
                f"need at least one page of at least one token, got "
                f"num_pages={num_pages}, page_size={page_size}"
            )
        return [
            torch.zeros((num_pages, page_size, self.latent_dim), dtype=self.dtype, device=device)
            for _ in range(self.num_layers)
        ]


class ReplicatedLinear(nn.Module):
    """A linear map held whole on every rank (MLA's small down-projections)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ctx: ParallelContext,
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.weight = new_parameter((output_size, input_size), ctx, dtype, default_weight_loader)
        self.bias = (
            new_parameter((output_size,), ctx, dtype, default_weight_loader) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class HeadParallelLinear(nn.Module):
    """Output rows grouped per head, this rank keeping heads ``[head_start, head_end)``."""

    def __init__(
        self,
        input_size: int,
        num_heads: int,
        head_size: int,
        ctx: ParallelContext,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.head_start, self.head_end = split_range(num_heads, ctx.tp_size, ctx.tp_rank)
        self.head_size = head_size
        local = (self.head_end - self.head_start) * head_size
        self.weight = new_parameter((local, input_size), ctx, dtype, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
        rows = loaded[self.head_start * self.head_size : self.head_end * self.head_size]
        copy_checked(param.data, rows, "head-parallel rows")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # [T, local_heads * head_size]


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., d] pairs (x0, x1), (x2, x3), ... -> [evens | odds], so "rotate half" RoPE
    equals DeepSeek's interleaved RoPE (transformers does the same, bit for bit)."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def mla_softmax_scale(config: Any) -> float:
    """``qk_head_dim ** -0.5``, times yarn's ``mscale(factor, mscale_all_dim) ** 2`` if set."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    mscale_all_dim = params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim:
        factor = params["factor"]
        mscale = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
        scale = scale * mscale * mscale
    return scale


class MLAAttention(nn.Module):
    """MLA over this rank's heads; ``o_proj`` sums the ranks' partial outputs."""

    def __init__(
        self, config: Any, ctx: ParallelContext, dtype: torch.dtype, rotary: RotaryEmbedding
    ) -> None:
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        if heads < ctx.tp_size:
            raise ValueError(
                f"MLA splits its {heads} heads over tp; tensor_parallel_size "
                f"{ctx.tp_size} must not exceed that"
            )
        bias = bool(getattr(config, "attention_bias", False))
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.kv_rank = config.v_head_dim, config.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.interleave = bool(getattr(config, "rope_interleave", True))
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = HeadParallelLinear(hidden, heads, self.qk_dim, ctx, dtype=dtype)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, ctx, bias=bias, dtype=dtype)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6, ctx, dtype)
            self.q_b_proj = HeadParallelLinear(
                self.q_lora_rank, heads, self.qk_dim, ctx, dtype=dtype
            )
        self.kv_a_proj_with_mqa = ReplicatedLinear(
            hidden, self.kv_rank + self.rope_dim, ctx, bias=bias, dtype=dtype
        )
        self.kv_a_layernorm = RMSNorm(self.kv_rank, 1e-6, ctx, dtype)
        self.kv_b_proj = HeadParallelLinear(
            self.kv_rank, heads, self.nope_dim + self.v_dim, ctx, dtype=dtype
        )
        h0, h1 = self.kv_b_proj.head_start, self.kv_b_proj.head_end
        self.num_local_heads = h1 - h0
        self.o_proj = RowParallelLinear(
            heads * self.v_dim,
            hidden,
            ctx,
            bias=bias,
            dtype=dtype,
            input_range=(h0 * self.v_dim, h1 * self.v_dim),
        )
        self.rotary_emb = rotary
        self.scale = mla_softmax_scale(config)
        self.latent_dim = self.kv_rank + self.rope_dim
        self.kv_cache: torch.Tensor | None = None  # [pages, page_size, latent_dim]
        # Seen as a cache layout, MLA has one "KV head" of size latent_dim.
        self.num_kv_heads, self.head_dim = 1, self.latent_dim
        self.use_kernel: bool | None = None  # None: the C++ kernel on CPU when it builds

    @property
    def attn(self) -> MLAAttention:
        """The part that owns the cache (for dense attention a separate module; here itself)."""
        return self

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens, heads = hidden.shape[0], self.num_local_heads
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q = q.view(num_tokens, heads, self.qk_dim)
        q_nope, q_rot = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(hidden).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())  # [T, kv_rank]
        if self.interleave:
            q_rot, k_rot = deinterleave(q_rot), deinterleave(k_rot)
        q_rot, k_rot = self.rotary_emb(
            positions, q_rot.reshape(num_tokens, -1), k_rot.contiguous(), meta
        )
        q = torch.cat([q_nope, q_rot.view(num_tokens, heads, self.rope_dim)], dim=-1)  # [T, h, qk]
        entries = torch.cat([latent, k_rot], dim=-1)  # [T, latent_dim]
        if self.kv_cache is not None and (
            isinstance(meta, StepTensors) or num_tokens and use_kernel(self.use_kernel, self.kv_cache)
        ):
            out = self._absorbed(q, entries, meta)
            return self.o_proj(out.reshape(num_tokens, heads * self.v_dim))  # [T, hidden]
        if self.kv_cache is not None and num_tokens:
            self.kv_cache.view(-1, self.latent_dim).index_copy_(0, meta.slot_mapping, entries)
        out = torch.empty(num_tokens, heads, self.v_dim, dtype=q.dtype, device=q.device)
        if meta.num_decodes:
            idx = meta.decode_index
            out[idx] = self._decode(q[idx], entries[idx], meta)
        for i, seq in enumerate(meta.prefills):
            s, e = seq.token_start, seq.token_end
            out[s:e] = self._prefill(i, seq, q[s:e], entries[s:e], meta)
        return self.o_proj(out.view(num_tokens, heads * self.v_dim))  # [T, hidden]

    def _absorbed(self, q: torch.Tensor, entries: torch.Tensor, meta: Any) -> torch.Tensor:
        """q: [T, h, qk], entries [T, latent_dim] (cached by the same op) -> [T, h, v] by
        the C++ kernel over the cached latents, in place.

        ``kv_b_proj`` is folded into the query (scores: ``(q_nope W_uk) . latent +
        q_rope . k_rope``) and into the output (``(probs . latent) W_uv``), so the cache
        is read as one MQA head of size latent_dim whose values are its first kv_rank dims.
        """
        w = self.kv_b_proj.weight.view(self.num_local_heads, self.nope_dim + self.v_dim,
                                       self.kv_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim :]  # [h, nope, r], [h, v, r]
        q_lat = torch.einsum("thn,hnr->thr", q[..., : self.nope_dim], w_uk)  # [T, h, r]
        q_full = torch.cat([q_lat, q[..., self.nope_dim :]], dim=-1)  # [T, h, latent_dim]
        pages, page_size = self.kv_cache.shape[:2]
        keys = self.kv_cache.view(pages, page_size, 1, self.latent_dim)
        values = keys[..., : self.kv_rank]  # [P, S, 1, r], a view of the same rows
        out = cached_attention(q_full, entries[:, None], None, keys, values, meta.slot_mapping,
                               meta.page_table, meta.query_start, meta.context_lens,
                               self.scale, 0)  # [T, h, r]
        return torch.einsum("thr,hvr->thv", out, w_uv)  # [T, h, v]

    def _expand(self, entries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., C, latent_dim] -> keys [..., h, C, qk], values [..., h, C, v]."""
        kv = self.kv_b_proj(entries[..., : self.kv_rank])  # [..., C, h * (nope + v)]
        kv = kv.view(*entries.shape[:-1], self.num_local_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rot = entries[..., None, self.kv_rank :].expand(*k_nope.shape[:-1], self.rope_dim)
        k = torch.cat([k_nope, k_rot], dim=-1)  # [..., C, h, qk]
        return k.transpose(-3, -2), v.transpose(-3, -2)

    def _decode(self, q: torch.Tensor, new: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [D, h, qk] -> [D, h, v], all decodes in one SDPA over their gathered pages."""
        if self.kv_cache is None:
            if meta.max_decode_context > 1:
                raise RuntimeError("decode with cached context but no KV cache bound")
            return self._expand(new[:, None])[1].squeeze(-2)  # softmax over one key is 1
        table = meta.decode_page_table  # [D, P]
        entries = self.kv_cache[table].flatten(1, 2)  # [D, S, latent_dim]
        k, v = self._expand(entries)  # [D, h, S, qk], [D, h, S, v]
        out = F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=meta.decode_mask(None), scale=self.scale
        )  # [D, h, 1, v]
        return out.squeeze(2)

    def _prefill(
        self, index: int, seq: Any, q: torch.Tensor, new: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [L, h, qk], new: [L, latent_dim] (this chunk) -> [L, h, v]."""
        if seq.num_computed == 0:
            entries = new  # the chunk is the whole context
        elif self.kv_cache is None:
            raise RuntimeError("prefill after cached tokens but no KV cache bound")
        else:
            entries = self.kv_cache[seq.page_ids].flatten(0, 1)[
                : seq.context_len
            ]  # [C, latent_dim]
        k, v = self._expand(entries)  # [h, C, qk], [h, C, v]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k, v, attn_mask=meta.prefill_mask(index, None, 1), scale=self.scale
        )  # [h, L, v]
        return out.transpose(0, 1)
