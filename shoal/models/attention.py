"""Paged attention over a per-layer KV cache, in plain torch (CPU and CUDA alike).

Cache layout per layer: ``[2, num_pages, page_size, num_local_kv_heads, head_dim]``
(index 0 keys, 1 values). Page ``p`` of a sequence's page table holds its positions
``p_index * page_size ...``; a token's *slot* is ``page * page_size + offset``.

One forward pass carries a flat batch of tokens from several sequences, described by
:class:`AttentionMetadata`. Each attention layer first writes the new keys/values into
the cache through ``slot_mapping``, then:

- on CPU, one call of the C++ kernel (``shoal.models.ops.paged_attention``) covers
  every sequence, decodes and prefill chunks alike, reading keys and values in place
  through each page table;
- otherwise (CUDA, or no compiler) the reference path: decodes (query length 1) are
  batched into one gather of their pages (padded to the longest context) and one
  ``scaled_dot_product_attention`` with a padding mask; prefill chunks (query length
  > 1, possibly after cached tokens) run one SDPA each, causal within the chunk, over
  the cached context plus the chunk.

Grouped-query attention never copies KV heads: the query heads of one KV head are
folded into the query-length axis (``[kv_heads, group * q_len, head_dim]``), so every
KV head is read once. Sliding-window layers (Mistral, Qwen with ``layer_types``) mask
keys at or before ``q_pos - window``, as Hugging Face does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shoal.models.ops.paged_attention import cached_attention, kernel_available


@dataclass
class PrefillSeq:
    """One sequence of the batch with more than one new token."""

    token_start: int  # first of its tokens in the flat batch
    token_end: int
    num_computed: int  # tokens already in the cache before this step
    page_ids: torch.Tensor  # [ceil(context_len / page_size)] pages covering the context

    @property
    def query_len(self) -> int:
        return self.token_end - self.token_start

    @property
    def context_len(self) -> int:
        return self.num_computed + self.query_len


@dataclass
class AttentionMetadata:
    """Where the tokens of one flat batch sit in the paged KV cache.

    Build it with :meth:`build`; one object is shared by every layer of a forward pass
    (masks and RoPE tables are computed once and kept in ``cache``).
    """

    num_tokens: int
    page_size: int
    slot_mapping: torch.Tensor  # [T] cache slot of every new token
    positions: torch.Tensor  # [T] position of every token in its sequence
    token_context_lens: torch.Tensor  # [T] context length of each token's sequence
    max_context_len: int  # longest context in the batch (cached + new)
    prefills: list[PrefillSeq]
    decode_index: slice | torch.Tensor | None  # decode tokens in the flat batch
    decode_page_table: torch.Tensor | None  # [D, max_pages] (padded with page 0)
    decode_context_lens: torch.Tensor | None  # [D]
    num_decodes: int = 0
    max_decode_context: int = 0
    # every sequence, for the in-place kernel (shoal.models.ops.paged_attention)
    page_table: torch.Tensor | None = None  # [B, max_pages] (padded with page 0)
    query_start: torch.Tensor | None = None  # [B + 1] first token of each sequence
    context_lens: torch.Tensor | None = None  # [B] cached + new tokens
    # per-forward values shared by all layers (masks, RoPE cos/sin), filled on first use
    cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        num_computed: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """Describe a batch: sequence i has ``query_lens[i]`` consecutive tokens at
        positions ``num_computed[i] ...``, and its pages are ``page_tables[i]``."""
        if not len(query_lens) == len(num_computed) == len(page_tables):
            raise ValueError(
                f"query_lens, num_computed and page_tables must have one entry per sequence; "
                f"got {len(query_lens)}, {len(num_computed)}, {len(page_tables)}"
            )
        context_lens = [n + q for n, q in zip(num_computed, query_lens)]
        pages_needed = [-(-c // page_size) for c in context_lens]
        for i, (table, need) in enumerate(zip(page_tables, pages_needed)):
            if len(table) < need:
                raise ValueError(
                    f"sequence {i} needs {need} pages of {page_size} tokens for "
                    f"{context_lens[i]} tokens but its page table has {len(table)}"
                )
        max_pages = max(pages_needed, default=0)
        padded = np.zeros((len(page_tables), max_pages), np.int64)
        for i, table in enumerate(page_tables):
            row = list(table[:max_pages])
            padded[i, : len(row)] = row
        return cls.from_arrays(np.asarray(query_lens, np.int64), np.asarray(num_computed, np.int64),
                               padded, page_size, device)

    @classmethod
    def from_arrays(
        cls,
        query_lens: np.ndarray,
        num_computed: np.ndarray,
        page_table: np.ndarray,
        page_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """:meth:`build` from columns: int [B] lengths and counts, int [B, P] page tables.

        ``page_table`` must cover every sequence's context (the caller checks); it is
        what the worker's request table holds, so a decode batch costs a few tensor ops.
        """
        device = torch.device(device)
        q_lens = torch.from_numpy(np.asarray(query_lens, np.int64))  # [B]
        computed = torch.from_numpy(np.asarray(num_computed, np.int64))  # [B]
        padded = torch.from_numpy(np.asarray(page_table)).long()  # [B, max_pages]
        num_seqs = len(q_lens)
        context = computed + q_lens  # [B]
        num_tokens = int(q_lens.sum())
        starts = torch.cumsum(q_lens, 0) - q_lens  # [B] first token of each sequence
        all_decodes = num_tokens == num_seqs and bool((q_lens == 1).all())  # one new token each
        if all_decodes:
            seq_of_token = torch.arange(num_seqs)
            positions = computed.clone()
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)  # [T]
            positions = computed[seq_of_token] + torch.arange(num_tokens) - starts[seq_of_token]
        slot_mapping = padded[seq_of_token, positions // page_size] * page_size + positions % page_size
        token_context_lens = context[seq_of_token]
        max_context = int(context.max()) if num_seqs else 0
        padded = padded.to(device)

        q_list = q_lens.tolist() if not all_decodes else None
        prefills = []
        if not all_decodes:
            token_starts, computed_list = starts.tolist(), computed.tolist()
            for i, q in enumerate(q_list):
                if q > 1:
                    need = -(-(computed_list[i] + q) // page_size)
                    prefills.append(PrefillSeq(token_starts[i], token_starts[i] + q,
                                               computed_list[i], padded[i, :need]))
        decode_index = decode_table = decode_ctx = None
        max_decode_context = 0
        decodes = torch.arange(num_seqs) if all_decodes else torch.nonzero(q_lens == 1).flatten()
        num_decodes = len(decodes)
        if num_decodes:
            decode_starts = starts[decodes]
            first = int(decode_starts[0])
            contiguous = bool((decode_starts == torch.arange(first, first + num_decodes)).all())
            decode_index = (slice(first, first + num_decodes) if contiguous
                            else decode_starts.to(device))
            decode_ctx = context[decodes]
            max_decode_context = int(decode_ctx.max())
            decode_table = padded[decodes.to(device), : -(-max_decode_context // page_size)]
            decode_ctx = decode_ctx.to(device)
        return cls(
            num_tokens=num_tokens,
            page_size=page_size,
            slot_mapping=slot_mapping.to(device),
            positions=positions.to(device),
            token_context_lens=token_context_lens.to(device),
            max_context_len=max_context,
            prefills=prefills,
            decode_index=decode_index,
            decode_page_table=decode_table,
            decode_context_lens=decode_ctx,
            num_decodes=num_decodes,
            max_decode_context=max_decode_context,
            page_table=padded,
            query_start=torch.cat([starts, q_lens.sum(0, keepdim=True)]).to(device),
            context_lens=context.to(device),
        )

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[D, 1, 1, max_pages * page_size] True where a decode may attend."""
        key = ("decode", window)
        if key not in self.cache:
            assert self.decode_page_table is not None and self.decode_context_lens is not None
            span = self.decode_page_table.shape[1] * self.page_size
            kv_pos = torch.arange(span, device=self.decode_context_lens.device)  # [S]
            ctx = self.decode_context_lens[:, None]  # [D, 1]
            mask = kv_pos < ctx
            if window is not None:
                mask &= kv_pos > ctx - 1 - window
            self.cache[key] = mask[:, None, None, :]
        return self.cache[key]

    def prefill_mask(self, index: int, window: int | None, group: int) -> torch.Tensor:
        """[group * query_len, context_len] causal (and windowed) mask of prefill ``index``."""
        key = ("prefill", index, window, group)
        if key not in self.cache:
            seq = self.prefills[index]
            device = self.slot_mapping.device
            q_pos = torch.arange(seq.num_computed, seq.context_len, device=device)[:, None]
            kv_pos = torch.arange(seq.context_len, device=device)[None, :]
            mask = kv_pos <= q_pos  # [L, C]
            if window is not None:
                mask &= kv_pos > q_pos - window
            self.cache[key] = mask.repeat(group, 1)
        return self.cache[key]


@dataclass
class StepTensors:
    """The tensors-only view of :class:`AttentionMetadata` a compiled forward takes.

    Only the in-place kernel path reads it (no Python lists, no per-forward cache), so
    ``torch.compile`` guards on nothing that changes from step to step.
    """

    slot_mapping: torch.Tensor  # [T]
    page_table: torch.Tensor  # [B, max_pages]
    query_start: torch.Tensor  # [B + 1]
    context_lens: torch.Tensor  # [B]

    @classmethod
    def of(cls, meta: AttentionMetadata) -> StepTensors:
        return cls(meta.slot_mapping, meta.page_table, meta.query_start, meta.context_lens)


def use_kernel(choice: bool | None, cache: torch.Tensor) -> bool:
    """Whether a layer runs the in-place C++ kernel: ``choice``, or by default whenever
    the cache is on CPU and the kernel is available (else gather + SDPA)."""
    if choice is None:
        return cache.device.type == "cpu" and kernel_available()
    return choice


class AttentionBackend(Protocol):
    """Attention over new q/k/v and the paged cache; see :class:`PagedAttention`."""

    kv_cache: torch.Tensor | None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...


class PagedAttention(nn.Module):
    """Paged attention for one layer's local heads (torch SDPA; runs on CPU and CUDA).

    ``kv_cache`` is bound after allocation (``[2, pages, page_size, kv_heads, head_dim]``).
    Without a cache (e.g. a profiling run) every sequence must start at position 0.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        scale: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"local query heads ({num_heads}) must be a multiple of local "
                f"KV heads ({num_kv_heads})"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None
        # None: the C++ kernel when the cache is on CPU and the kernel builds
        self.use_kernel: bool | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, heads * head_dim]; k, v: [T, kv_heads * head_dim] -> [T, heads * head_dim]."""
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        cache = self.kv_cache
        if cache is not None and isinstance(meta, StepTensors) or (
            cache is not None and num_tokens and use_kernel(self.use_kernel, cache)
        ):  # one opaque op: write the new keys/values, read every context in place
            out = cached_attention(q, k, v, cache[0], cache[1], meta.slot_mapping,
                                   meta.page_table, meta.query_start, meta.context_lens,
                                   self.scale, self.sliding_window or 0)
            return out.view(num_tokens, self.num_heads * self.head_dim)
        if cache is not None and num_tokens:
            flat = cache.view(2, -1, self.num_kv_heads, self.head_dim)  # [2, slots, Hkv, D]
            flat[0].index_copy_(0, meta.slot_mapping, k)
            flat[1].index_copy_(0, meta.slot_mapping, v)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
        if meta.num_decodes:
            idx = meta.decode_index
            out[idx] = self._decode(q[idx], v[idx], meta)
        for i, seq in enumerate(meta.prefills):
            s, e = seq.token_start, seq.token_end
            out[s:e] = self._prefill(i, seq, q[s:e], k[s:e], v[s:e], meta)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _decode(
        self, q: torch.Tensor, v_new: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [D, H, Dh] -> [D, H, Dh], every decode in one gather and one SDPA."""
        cache = self.kv_cache
        if cache is None:  # no cache: only a first token (context 1) can decode
            if meta.max_decode_context > 1:
                raise RuntimeError("decode with cached context but no KV cache bound")
            return v_new.repeat_interleave(self.group, dim=1)  # softmax over one key is 1
        num = q.shape[0]
        table = meta.decode_page_table  # [D, P]
        span = table.shape[1] * meta.page_size
        k = cache[0][table].view(num, span, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = cache[1][table].view(num, span, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q.view(num, self.num_kv_heads, self.group, self.head_dim)  # [D, Hkv, g, Dh]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=meta.decode_mask(self.sliding_window), scale=self.scale
        )
        return out.reshape(num, self.num_heads, self.head_dim)

    def _prefill(
        self,
        index: int,
        seq: PrefillSeq,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: [L, H, Dh], k/v: [L, Hkv, Dh] (this chunk) -> [L, H, Dh]."""
        length, ctx = seq.query_len, seq.context_len
        if seq.num_computed == 0:
            k_ctx, v_ctx = k, v  # [L, Hkv, Dh]: the chunk is the whole context
        elif self.kv_cache is None:
            raise RuntimeError("prefill after cached tokens but no KV cache bound")
        else:
            pages = self.kv_cache[:, seq.page_ids]  # [2, n, page_size, Hkv, Dh]
            flat = pages.view(2, -1, self.num_kv_heads, self.head_dim)[:, :ctx]
            k_ctx, v_ctx = flat[0], flat[1]  # [C, Hkv, Dh]
        qf = (
            q.view(length, self.num_kv_heads, self.group, self.head_dim)
            .permute(1, 2, 0, 3)
            .reshape(self.num_kv_heads, self.group * length, self.head_dim)
        )
        out = F.scaled_dot_product_attention(  # 4-D so fused CUDA kernels apply
            qf[None],
            k_ctx.transpose(0, 1)[None],
            v_ctx.transpose(0, 1)[None],
            attn_mask=meta.prefill_mask(index, self.sliding_window, self.group),
            scale=self.scale,
        )  # [1, Hkv, g * L, Dh]
        return (
            out.view(self.num_kv_heads, self.group, length, self.head_dim)
            .permute(2, 0, 1, 3)
            .reshape(length, self.num_heads, self.head_dim)
        )
