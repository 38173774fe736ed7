"""The in-place paged attention kernel equals the gather reference (float32 tolerance;
bfloat16 inputs against the float32 reference of the same values), and the reference
equals the model's gather + SDPA path."""
from __future__ import annotations

import pytest
import torch

from shoal.models.attention import AttentionMetadata, PagedAttention
from shoal.models.ops import paged_attention as pa

needs_kernel = pytest.mark.skipif(not pa.kernel_available(), reason="C++ kernel not built")


def _batch(query_lens, num_computed, page_size, hq, hkv, dk, dv=None, latent=False, seed=0):
    """Random q and a paged cache holding every sequence's context on shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    ctx = [n + q for n, q in zip(num_computed, query_lens)]
    need = [-(-c // page_size) for c in ctx]
    num_pages = sum(need) + 3
    perm = torch.randperm(num_pages, generator=gen).tolist()
    tables, at = [], 0
    for n in need:
        tables.append(perm[at : at + n])
        at += n
    width = max(need)
    table = torch.tensor([t + [perm[-1]] * (width - len(t)) for t in tables])  # [B, width]
    if latent:  # MLA: one latent row per token; keys all of it, values its first dv dims
        cache = torch.randn(num_pages, page_size, 1, dk, generator=gen)
        k_cache, v_cache = cache, cache[..., :dv]
    else:
        cache = torch.randn(2, num_pages, page_size, hkv, dk, generator=gen)
        k_cache, v_cache = cache[0], cache[1]
    q = torch.randn(sum(query_lens), hq, dk, generator=gen)
    starts = torch.tensor([0] + query_lens).cumsum(0)
    return q, k_cache, v_cache, table, starts, torch.tensor(ctx), tables


@needs_kernel
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_matches_reference_ragged(page_size, hq, hkv, window):
    # decodes of ragged lengths, a prefill chunk after cached context, a fresh prefill
    query_lens = [1, 1, 1, 37, 1, 5, 19]
    num_computed = [0, 17, 130, 45, 64, 0, 0]
    q, kc, vc, table, starts, ctx, _ = _batch(query_lens, num_computed, page_size, hq, hkv, 64)
    args = (q, kc, vc, table, starts, ctx, 0.125, window)
    torch.testing.assert_close(pa.paged_attention(*args), pa.paged_attention_reference(*args),
                               rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("page_size", [16, 32])
def test_kernel_matches_reference_mla_latent(page_size):
    query_lens, num_computed = [1, 1, 12, 1], [3, 70, 20, 0]
    q, kc, vc, table, starts, ctx, _ = _batch(query_lens, num_computed, page_size, 4, 1,
                                              dk=48, dv=32, latent=True)
    args = (q, kc, vc, table, starts, ctx, 0.2, None)
    out = pa.paged_attention(*args)
    assert out.shape == (sum(query_lens), 4, 32)
    torch.testing.assert_close(out, pa.paged_attention_reference(*args), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_bfloat16_close_to_float32():
    q, kc, vc, table, starts, ctx, _ = _batch([1, 1, 9], [40, 3, 20], 16, 6, 2, 32)
    ref = pa.paged_attention_reference(q, kc, vc, table, starts, ctx, 0.17)
    out = pa.paged_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), table, starts, ctx, 0.17)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def _as_bf16(*tensors):
    return [t.bfloat16() for t in tensors]


@needs_kernel
@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_bfloat16_matches_float32_reference_of_same_values(page_size, hq, hkv, window):
    """bf16 inputs vs the float32 reference of the very same (bf16-rounded) values: only
    the kernel's float32 sums and the bf16 rounding of its output differ."""
    query_lens = [1, 1, 1, 37, 1, 5, 19]
    num_computed = [0, 17, 130, 45, 64, 0, 0]
    q, kc, vc, table, starts, ctx, _ = _batch(query_lens, num_computed, page_size, hq, hkv, 64)
    q, kc, vc = _as_bf16(q, kc, vc)
    out = pa.paged_attention(q, kc, vc, table, starts, ctx, 0.125, window)
    assert out.dtype == torch.bfloat16
    ref = pa.paged_attention_reference(q.float(), kc.float(), vc.float(), table, starts, ctx,
                                       0.125, window)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("page_size", [16, 32])
def test_kernel_bfloat16_mla_latent(page_size):
    query_lens, num_computed = [1, 1, 12, 1], [3, 70, 20, 0]
    q, kc, vc, table, starts, ctx, _ = _batch(query_lens, num_computed, page_size, 4, 1,
                                              dk=48, dv=32, latent=True)
    q, kc = _as_bf16(q, kc)
    vc = kc[..., :32]  # still a view of the latent rows
    out = pa.paged_attention(q, kc, vc, table, starts, ctx, 0.2, None)
    ref = pa.paged_attention_reference(q.float(), kc.float(), vc.float(), table, starts, ctx,
                                       0.2, None)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("window", [None, 20])
def test_reference_matches_gather_sdpa_layer(window):
    """The reference contract is the one PagedAttention's gather + SDPA path computes."""
    page_size, hq, hkv, dim = 16, 6, 2, 32
    query_lens, num_computed = [1, 1, 23, 1], [50, 7, 31, 0]
    q, kc, vc, table, starts, ctx, tables = _batch(query_lens, num_computed, page_size, hq, hkv,
                                                   dim)
    layer = PagedAttention(hq, hkv, dim, sliding_window=window)
    layer.kv_cache = torch.stack([kc, vc]).clone()
    meta = AttentionMetadata.build(query_lens, num_computed, tables, page_size, "cpu")
    flat = layer.kv_cache.view(2, -1, hkv, dim)
    k_new, v_new = flat[0][meta.slot_mapping], flat[1][meta.slot_mapping]  # already cached
    layer.use_kernel = False
    out = layer(q.reshape(len(q), -1), k_new.reshape(len(q), -1), v_new.reshape(len(q), -1), meta)
    ref = pa.paged_attention_reference(q, kc, vc, table, starts, ctx, dim**-0.5, window)
    torch.testing.assert_close(out.view_as(ref), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_reads_strided_queries_in_place():
    # q as the models pass it: the q part of fused qkv rows (token stride > Hq * Dk)
    query_lens, num_computed = [1, 7, 1], [30, 12, 0]
    q, kc, vc, table, starts, ctx, _ = _batch(query_lens, num_computed, 16, 6, 2, 32)
    qkv = torch.randn(q.shape[0], 10, 32)
    qkv[:, :6] = q
    args = (table, starts, ctx, 0.2, None)
    torch.testing.assert_close(pa.paged_attention(qkv[:, :6], kc, vc, *args),
                               pa.paged_attention(q, kc, vc, *args), rtol=0, atol=0)
