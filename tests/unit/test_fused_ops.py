"""The fused CPU kernels (RMSNorm, add + RMSNorm, rotary, SiLU * up, the KV write of
cached_attention) against the torch ops they replace: bit for bit in bfloat16 (they
round where the torch ops round), within an ulp or two in float32 (a reduction order,
an exp), on strided views as the models pass them, and with clear errors on bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.models.ops import fused
from shoal.models.ops import paged_attention as pa
from shoal.models.rope import RotaryEmbedding

pytestmark = pytest.mark.skipif(not (fused.fused_ops_available() and pa.kernel_available()),
                                reason="C++ kernels not built")
DTYPES = [torch.float32, torch.bfloat16]


def reference_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=4e-6, atol=4e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [576, 64, 37, 8])
def test_rms_norm_and_fused_add(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x = torch.randn(13, dim, generator=gen).to(dtype)
    res = torch.randn(13, dim, generator=gen).to(dtype)
    w = torch.randn(dim, generator=gen).to(dtype)
    assert_matches(fused.rms_norm(x, w, 1e-5), reference_rms(x, w, 1e-5))
    total = x + res
    x2, res2 = x.clone(), res.clone()
    out, new_res = fused.fused_add_rms_norm(x2, res2, w, 1e-5)
    assert out.data_ptr() == x2.data_ptr() and new_res.data_ptr() == res2.data_ptr()
    assert torch.equal(res2, total)  # the sum, rounded once, as x + residual
    assert_matches(x2, reference_rms(total, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_of_strided_view(dtype):
    # Qwen3's q/k norm: heads of the q part of a fused qkv row
    qkv = torch.randn(5, 4 * 24 + 2 * 24).to(dtype)
    q = qkv[:, : 4 * 24].reshape(5, 4, 24)
    w = torch.randn(24).to(dtype)
    assert_matches(fused.rms_norm(q, w, 1e-6), reference_rms(q, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [1536, 40, 7])
def test_silu_and_mul(dtype, inter):
    gate_up = (torch.randn(9, 2 * inter) * 6).to(dtype)
    gate, up = gate_up.split(inter, dim=-1)
    assert_matches(fused.silu_and_mul(gate_up), F.silu(gate) * up)
    wide = torch.randn(9, 2 * inter + 5).to(dtype)[:, : 2 * inter]  # rows 2I + 5 apart
    gate, up = wide.split(inter, dim=-1)
    assert_matches(fused.silu_and_mul(wide), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,fraction", [(64, 1.0), (40, 1.0), (64, 0.5), (8, 1.0)])
def test_rotary_in_place_on_qkv_views(dtype, head_dim, fraction):
    rope = RotaryEmbedding(head_dim, 128, {"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": fraction})
    qkv = torch.randn(6, 8 * head_dim).to(dtype)
    q, k = qkv[:, : 4 * head_dim], qkv[:, 4 * head_dim : 6 * head_dim]
    v_before = qkv[:, 6 * head_dim :].clone()
    positions = torch.tensor([0, 5, 17, 100, 3, 127])
    cos = rope._cos[positions].to(dtype)[:, None, :]
    sin = rope._sin[positions].to(dtype)[:, None, :]
    want_q, want_k = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)
    fused.rotary_embedding(positions, q, k, rope._cos, rope._sin, head_dim)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(qkv[:, 6 * head_dim :], v_before)  # v untouched


def test_bad_input_names_the_problem():
    rope = RotaryEmbedding(16, 32, {"rope_type": "default", "rope_theta": 10000.0})
    q, k = torch.randn(2, 32), torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="outside the cos/sin table"):
        fused.rotary_embedding(torch.tensor([0, 40]), q, k, rope._cos, rope._sin, 16)
    with pytest.raises(RuntimeError, match="whole heads"):
        fused.rotary_embedding(torch.tensor([0, 1]), torch.randn(2, 30), k, rope._cos,
                               rope._sin, 16)
    with pytest.raises(RuntimeError, match="weight must be"):
        fused.rms_norm(torch.randn(3, 8), torch.randn(7), 1e-6)
    with pytest.raises(RuntimeError, match="must be \\[N, 2 \\* I\\]"):
        fused.silu_and_mul(torch.randn(3, 7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cached_attention_writes_new_rows_then_attends(dtype):
    pages, page_size, hkv, dim = 6, 4, 2, 16
    cache = torch.zeros(2, pages, page_size, hkv, dim, dtype=dtype)
    kv = torch.randn(2, 3, 3 * hkv, dim).to(dtype)[:, :, :hkv]  # strided rows, as qkv views
    slots = torch.tensor([9, 2, 22])
    q = torch.randn(3, 4, dim).to(dtype)
    table = torch.tensor([[2], [0], [5]])
    qstart, ctx = torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 3])
    out = pa.cached_attention(q, kv[0], kv[1], cache[0], cache[1], slots, table, qstart, ctx,
                              0.25, 0)
    flat = cache.view(2, -1, hkv, dim)
    assert torch.equal(flat[0, slots], kv[0]) and torch.equal(flat[1, slots], kv[1])
    assert int((flat.abs().sum((2, 3)) > 0).sum()) == 6  # nothing else written
    want = pa.paged_attention(q, cache[0], cache[1], table, qstart, ctx, 0.25, 0)
    assert torch.equal(out, want)
    with pytest.raises(RuntimeError, match="outside the cache"):
        pa.cached_attention(q, kv[0], kv[1], cache[0], cache[1], torch.tensor([0, 1, 24]),
                            table, qstart, ctx, 0.25, 0)


@pytest.mark.parametrize("shape", [(24, 49152), (1, 17), (3, 7), (5, 16), (2, 33)])
def test_argmax_rows_equals_torch(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1]))
    assert torch.equal(fused.argmax_rows(x), x.argmax(-1))


def test_argmax_rows_ties_and_nan_as_torch():
    x = torch.randn(4, 100)
    x[0, 10:] = 9.0  # a tie: the first index
    x[1, 50] = x[1, 70] = float("nan")  # NaN is the maximum: the first NaN
    x[2, 3:] = 5.0
    x[3, 98] = float("nan")  # in the scalar tail
    assert torch.equal(fused.argmax_rows(x), x.argmax(-1))
    assert fused.argmax_rows(x).tolist() == [10, 50, 3, 98]


def test_cached_attention_fresh_bf16_prefill_through_flash_sdpa():
    # a fresh 80-token bf16 prefill (flash SDPA), beside a decode and a chunk after cached
    # context (the kernel): all within bf16 tolerance of the float32 reference
    gen = torch.Generator().manual_seed(7)
    pages, page_size, hq, hkv, dim = 16, 16, 6, 2, 32
    cache = torch.zeros(2, pages, page_size, hkv, dim, dtype=torch.bfloat16)
    cache[:, 10:] = torch.randn(2, 6, page_size, hkv, dim, generator=gen).bfloat16()
    lens, computed = [80, 1, 20], [0, 30, 40]
    tables = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 0, 0, 0], [12, 13, 14, 15, 0]])
    slots = torch.cat([tables[b, (c + torch.arange(n)) // page_size] * page_size
                       + (c + torch.arange(n)) % page_size
                       for b, (n, c) in enumerate(zip(lens, computed))])
    total = sum(lens)
    q = torch.randn(total, hq, dim, generator=gen).bfloat16()
    kv = torch.randn(2, total, 3 * hkv, dim, generator=gen).bfloat16()[:, :, :hkv]
    qstart = torch.tensor([0, 80, 81, 101])
    ctx = torch.tensor([n + c for n, c in zip(lens, computed)])
    out = pa.cached_attention(q, kv[0], kv[1], cache[0], cache[1], slots, tables, qstart, ctx,
                              0.2, 0)
    ref = pa.paged_attention_reference(q.float(), cache[0].float(), cache[1].float(), tables,
                                       qstart, ctx, 0.2)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    kernel_only = pa.paged_attention(q, cache[0], cache[1], tables, qstart, ctx, 0.2, 0)
    assert torch.equal(out[80:], kernel_only[80:])  # the other sequences: the kernel's rows
