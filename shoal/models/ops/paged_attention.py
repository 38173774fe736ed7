"""Paged attention that reads the KV cache in place: C++ kernel on CPU, torch reference.

Both functions take one flat batch of sequences with ragged lengths, each with its own
page table; a sequence's new tokens (its last ``query_len`` positions) must already be
written into the cache. Query token ``i`` of a chunk of length ``L`` over a context of
``C`` tokens sits at position ``C - L + i`` and attends keys ``0 .. C - L + i``
(only the last ``window`` of them with a sliding window), as transformers masks.

Shapes:
    q             [T, Hq, Dk]      every new token of the batch, sequences back to back
    k_cache       [P, S, Hkv, Dk]  a view of the layer's cache (last dim contiguous)
    v_cache       [P, S, Hkv, Dv]  (MLA: both are views of one latent cache, Hkv = 1)
    page_table    [B, max_pages]   int64, padded with any valid page id
    query_start   [B + 1]          int64, sequence b owns q[query_start[b]:query_start[b+1]]
    context_lens  [B]              int64, cached + new tokens of each sequence
    -> out        [T, Hq, Dv]

The kernel is ``torch.ops.shoal.paged_attention`` (``csrc/paged_attention.cpp``, built
on first use by :mod:`shoal.models.ops.build`); it has a fake implementation, so
``torch.compile`` treats it as one opaque call. ``torch.ops.shoal.cached_attention``
(same file) writes the new keys/values into the cache first, in the same opaque call.
"""

from __future__ import annotations

import functools

import torch

from shoal.models.ops.build import kernel_loaded


@functools.cache
def kernel_available() -> bool:
    """True once the C++ kernel is built and loaded (False, logged, if it cannot be)."""
    if not kernel_loaded("paged_attention", "gather + SDPA"):
        return False
    _register_fake()
    return True


def _register_fake() -> None:
    @torch.library.register_fake("shoal::paged_attention")
    def _(q, k_cache, v_cache, page_table, query_start, context_lens, scale, window):
        return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[3]))

    @torch.library.register_fake("shoal::cached_attention")
    def _(q, k_new, v_new, k_cache, v_cache, slot_mapping, page_table, query_start,
          context_lens, scale, window):
        return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[3]))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Attention of ``q`` over each sequence's paged context, read in place (C++ kernel)."""
    return torch.ops.shoal.paged_attention(
        q, k_cache, v_cache, page_table, query_start, context_lens, float(scale), window or 0
    )


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """The same contract by gathering each sequence's pages and one masked softmax each."""
    page_size, hkv = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // hkv
    out = q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])
    starts = query_start.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        if s == e:
            continue
        pages = page_table[b, : -(-ctx // page_size)]
        k = k_cache[pages].flatten(0, 1)[:ctx].float()  # [C, Hkv, Dk]
        v = v_cache[pages].flatten(0, 1)[:ctx].float()  # [C, Hkv, Dv]
        q_pos = torch.arange(ctx - (e - s), ctx, device=q.device)[:, None]  # [L, 1]
        kv_pos = torch.arange(ctx, device=q.device)[None, :]  # [1, C]
        mask = kv_pos <= q_pos
        if window:
            mask &= kv_pos > q_pos - window
        qs = q[s:e].float().view(e - s, hkv, group, -1)  # [L, Hkv, g, Dk]
        scores = torch.einsum("lhgd,chd->hglc", qs, k) * scale  # [Hkv, g, L, C]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("hglc,chd->lhgd", probs, v)  # [L, Hkv, g, Dv]
        out[s:e] = o.reshape(e - s, q.shape[1], -1).to(q.dtype)
    return out


def cached_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    page_table: torch.Tensor,
    query_start: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """Write ``k_new``/``v_new`` [T, Hkv, D] at ``slot_mapping`` [T], then attend in place.

    ``v_new`` None: the values are a view of the key rows (MLA's latent). One C++ call
    (``torch.ops.shoal.cached_attention``), whose schema does not declare the cache
    writes: see ``csrc/paged_attention.cpp``.
    """
    return torch.ops.shoal.cached_attention(
        q, k_new, v_new, k_cache, v_cache, slot_mapping, page_table, query_start,
        context_lens, float(scale), int(window))
