// Paged attention on CPU that reads keys and values where they lie in the paged cache.
//
// One call covers a whole flat batch: decodes (one query token) and prefill chunks
// (several query tokens after cached context) of sequences with ragged lengths. The new
// tokens' keys/values must already be in the cache. Work items are (sequence, kv head,
// block of query tokens); the query heads of one kv head (the GQA group, or every head
// for MLA's single latent "head") share each key/value row they read. Items run largest
// first on torch's intra-op threads, taken from an atomic counter, so ragged lengths
// balance. Softmax is exact (scores, then max/exp/sum, then the weighted sum of values),
// accumulated in float32 whatever the cache dtype. Keys and values are read in blocks of
// 16 rows of one page (the next block prefetched): a key block is transposed once, so 16
// scores per query row are FMAs across keys; bf16 keys are dotted as bf16 pairs with
// vdpbf16ps where AVX512-BF16 exists. AVX-512 code is guarded by __AVX512F__ /
// __AVX512BF16__; elsewhere (AVX2, NEON) portable vector-extension code does the same.
//
// Shapes: q [T, Hq, Dk] (any token/head strides); k_cache [P, S, Hkv, Dk], v_cache [P, S, Hkv, Dv] (any strides,
// last dim contiguous: MLA passes two views of one latent cache); page_table [B, maxP];
// query_start [B + 1]; context_lens [B] (cached + new tokens). Returns [T, Hq, Dv].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <cmath>
#include <type_traits>
#include <vector>

#include "vec16.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kQueryBlock = 16;  // query tokens per work item of a prefill chunk

struct Item {
  int64_t seq, kv_head, t_begin, t_end, cost;  // t_*: token rows of the flat batch
};

// Keys and values are read in blocks of kBlock rows of one page. A block of keys is
// transposed once per work item ([dk][kBlock] floats, or [dk/2][kBlock] bf16 pairs), so
// the scores of one query row against the whole block are kBlock-wide FMAs with no
// horizontal sum, and every query row of the item (GQA group x token block) reuses it.
constexpr int64_t kBlock = 16;
constexpr int64_t kRowTile = 4;  // query rows whose accumulators stay in registers

using namespace shoal_vec;

inline float row_max(const float* x, int64_t n) {
  vec16 m = splat16(x[0]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec16 v = load16(x + i);
    m = v > m ? v : m;
  }
  float mx = m[0];
  for (int j = 1; j < 16; ++j) mx = std::max(mx, m[j]);
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// x[i] = exp(x[i] - shift) for i < n; x must have room for n rounded up to 16.
inline void exp_shifted(float* x, int64_t n, float shift) {
  for (int64_t i = 0; i < n; i += 16) store16(x + i, exp16(load16(x + i) - shift));
}

// Calls fn(first position, page id, offset in page, count, next page id, its offset) for
// blocks of at most kBlock consecutive positions of lo..hi that lie in one page; the next
// block's page id is -1 after the last block.
template <typename Fn>
inline void for_each_block(int64_t lo, int64_t hi, int64_t page_size, const int64_t* pages,
                           Fn fn) {
  int64_t pos = lo;
  while (pos <= hi) {
    const int64_t p = pos / page_size, off = pos % page_size;
    const int64_t n = std::min({kBlock, page_size - off, hi - pos + 1});
    const int64_t next = pos + n;
    fn(pos, pages[p], off, n, next <= hi ? pages[next / page_size] : -1, next % page_size);
    pos = next;
  }
}

// Asks for the cache lines of kBlock rows of `bytes` each, `stride` bytes apart.
inline void prefetch_rows(const void* first, int64_t stride, int64_t bytes) {
  const char* row = static_cast<const char*>(first);
  for (int64_t k = 0; k < kBlock; ++k, row += stride)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
}

#ifdef __AVX512F__
// Rows r[0..15] of 16 32-bit values each -> out[c] = column c.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i xa = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);
    const __m512i xb = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xdd);
    const __m512i ya = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i yb = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xdd);
    r[j] = _mm512_shuffle_i32x4(xa, ya, 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(xa, ya, 0xdd);
    r[4 + j] = _mm512_shuffle_i32x4(xb, yb, 0x88);
    r[12 + j] = _mm512_shuffle_i32x4(xb, yb, 0xdd);
  }
}

// n rows (row stride in 32-bit words) of `words` 32-bit values -> out[w * kBlock + row];
// rows n..15 read as zero.
inline void transpose_block32(const uint32_t* src, int64_t stride, int64_t n, int64_t words,
                              uint32_t* out) {
  __m512i r[16];
  for (int64_t w0 = 0; w0 < words; w0 += 16) {
    const int64_t nw = std::min<int64_t>(16, words - w0);
    const __mmask16 m = static_cast<__mmask16>((1u << nw) - 1);
    for (int64_t k = 0; k < 16; ++k)
      r[k] = k < n ? _mm512_maskz_loadu_epi32(m, src + k * stride + w0) : _mm512_setzero_si512();
    transpose16x16(r);
    for (int64_t c = 0; c < nw; ++c) _mm512_storeu_si512(out + (w0 + c) * kBlock, r[c]);
  }
}
#endif

// Keys of one block as floats, transposed: kt[d * kBlock + k] = key k, dim d.
template <typename T>
inline void transpose_keys(const T* k0, int64_t stride, int64_t n, int64_t dk, float* kt) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    transpose_block32(reinterpret_cast<const uint32_t*>(k0), stride, n, dk,
                      reinterpret_cast<uint32_t*>(kt));
    return;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (dk % 2 == 0 && stride % 2 == 0) {  // as bf16 pairs, then split each pair
      uint32_t* pairs = reinterpret_cast<uint32_t*>(kt) + dk / 2 * kBlock;  // upper half
      transpose_block32(reinterpret_cast<const uint32_t*>(k0), stride / 2, n, dk / 2, pairs);
      const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
      for (int64_t p = 0; p < dk / 2; ++p) {  // writes rows 2p, 2p+1 after reading row dk/2+p
        const __m512i w = _mm512_loadu_si512(pairs + p * kBlock);
        _mm512_storeu_si512(kt + 2 * p * kBlock, _mm512_slli_epi32(w, 16));
        _mm512_storeu_si512(kt + (2 * p + 1) * kBlock, _mm512_and_si512(w, hi));
      }
      return;
    }
  }
#endif
  for (int64_t k = 0; k < kBlock; ++k)
    for (int64_t d = 0; d < dk; ++d)
      kt[d * kBlock + k] = k < n ? static_cast<float>(k0[k * stride + d]) : 0.f;
}

// scores[r * ld + 0..15] = q[r] . key block (kt [dk][kBlock]) for NR rows.
template <int NR>
inline void score_rows(const float* q, int64_t dk, const float* kt, float* scores, int64_t ld) {
  vec16 a0[NR] = {}, a1[NR] = {};  // two chains per row hide the FMA latency
  int64_t d = 0;
  for (; d + 2 <= dk; d += 2) {
    const vec16 k0 = load16(kt + d * kBlock), k1 = load16(kt + (d + 1) * kBlock);
    for (int r = 0; r < NR; ++r) {
      a0[r] += q[r * dk + d] * k0;
      a1[r] += q[r * dk + d + 1] * k1;
    }
  }
  if (d < dk) {
    const vec16 k0 = load16(kt + d * kBlock);
    for (int r = 0; r < NR; ++r) a0[r] += q[r * dk + d] * k0;
  }
  for (int r = 0; r < NR; ++r) store16(scores + r * ld, a0[r] + a1[r]);
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bf16 queries and keys: the key block as bf16 pairs [dk/2][kBlock], dot products of
// pairs with vdpbf16ps (exact products, float32 sums); q holds each row's pairs.
template <int NR>
inline void score_rows_bf16(const uint32_t* q, int64_t np, const uint32_t* kt, float scale,
                            float* scores, int64_t ld) {
  __m512 a0[NR], a1[NR];
  for (int r = 0; r < NR; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 2 <= np; p += 2) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + p * kBlock);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + (p + 1) * kBlock);
    for (int r = 0; r < NR; ++r) {
      a0[r] = _mm512_dpbf16_ps(a0[r], k0, (__m512bh)_mm512_set1_epi32(q[r * np + p]));
      a1[r] = _mm512_dpbf16_ps(a1[r], k1, (__m512bh)_mm512_set1_epi32(q[r * np + p + 1]));
    }
  }
  if (p < np) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + p * kBlock);
    for (int r = 0; r < NR; ++r)
      a0[r] = _mm512_dpbf16_ps(a0[r], k0, (__m512bh)_mm512_set1_epi32(q[r * np + p]));
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < NR; ++r)
    _mm512_storeu_ps(scores + r * ld, _mm512_mul_ps(_mm512_add_ps(a0[r], a1[r]), s));
}
#endif

// out[r][d .. d + 16 NC) += sum over the block's n keys of w[r * ld + k] * v(k)[same dims]
// for NR rows: NR x NC accumulators stay in registers over the block.
template <int NR, int NC, typename T>
inline void accumulate_tile(const float* w, int64_t ld, const T* v0, int64_t vstride,
                            int64_t n, int64_t dv, int64_t d, float* out) {
  vec16 acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = load16(out + r * dv + d + 16 * c);
  for (int64_t k = 0; k < n; ++k) {
    vec16 x[NC];
    for (int c = 0; c < NC; ++c) x[c] = load16(v0 + k * vstride + d + 16 * c);
    for (int r = 0; r < NR; ++r) {
      const float wk = w[r * ld + k];
      for (int c = 0; c < NC; ++c) acc[r][c] += wk * x[c];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) store16(out + r * dv + d + 16 * c, acc[r][c]);
}

// out[r][0..dv) += sum over the block's n keys of w[r * ld + k] * v(k), NR rows.
template <int NR, typename T>
inline void accumulate_rows(const float* w, int64_t ld, const T* v0, int64_t vstride,
                            int64_t n, int64_t dv, float* out) {
  int64_t d = 0;
  for (; d + 64 <= dv; d += 64) accumulate_tile<NR, 4>(w, ld, v0, vstride, n, dv, d, out);
  for (; d + 16 <= dv; d += 16) accumulate_tile<NR, 1>(w, ld, v0, vstride, n, dv, d, out);
  for (; d < dv; ++d)
    for (int64_t k = 0; k < n; ++k) {
      const float x = static_cast<float>(v0[k * vstride + d]);
      for (int r = 0; r < NR; ++r) out[r * dv + d] += w[r * ld + k] * x;
    }
}

// Calls fn.template operator()<NR>(r0) for row tiles r0, r0 + kRowTile, ... of nrows.
template <typename Fn>
inline void for_row_tiles(int64_t nrows, Fn&& fn) {
  int64_t r = 0;
  for (; r + kRowTile <= nrows; r += kRowTile) fn(std::integral_constant<int, kRowTile>{}, r);
  switch (nrows - r) {
    case 3: fn(std::integral_constant<int, 3>{}, r); break;
    case 2: fn(std::integral_constant<int, 2>{}, r); break;
    case 1: fn(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// Buffers of one thread, grown to the largest item and then reused.
struct Scratch {
  std::vector<float> q, scores, out, kt;
  std::vector<uint32_t> q2;
  template <typename V>
  static auto* at_least(V& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

template <typename T>
void run_item(const Item& it, const T* q, int64_t qs0, int64_t qs1, int64_t hq, const T* kc,
              const T* vc,
              const int64_t ks[3], const int64_t vs[3], int64_t page_size, int64_t dk,
              int64_t dv, const int64_t* pages, int64_t pos_first, int64_t group, float scale,
              int64_t window, T* out, Scratch& s) {
  const int64_t ntok = it.t_end - it.t_begin, nq = ntok * group, h = it.kv_head;
  auto lo_of = [&](int64_t pos) { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; };
  const int64_t span_lo = lo_of(pos_first), span_hi = pos_first + ntok - 1;
  const int64_t span = span_hi - span_lo + 1;
  const int64_t ld = span + kBlock;  // a block's scores are written kBlock wide
  float* scores = Scratch::at_least(s.scores, nq * ld);
  float* acc = Scratch::at_least(s.out, nq * dv);
  std::fill(acc, acc + nq * dv, 0.f);
  float* kt = Scratch::at_least(s.kt, dk * kBlock);
  auto q_row = [&](int64_t row) {  // row = i * group + j
    return q + (it.t_begin + row / group) * qs0 + (h * group + row % group) * qs1;
  };
  auto key_block = [&](int64_t page, int64_t off) { return kc + page * ks[0] + off * ks[1] + h * ks[2]; };
  bool scored = false;
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (dk % 2 == 0 && ks[1] % 2 == 0) {
      const int64_t np = dk / 2;
      uint32_t* q2 = Scratch::at_least(s.q2, nq * np);
      for (int64_t row = 0; row < nq; ++row) __builtin_memcpy(q2 + row * np, q_row(row), dk * sizeof(T));
      uint32_t* kt2 = reinterpret_cast<uint32_t*>(kt);
      for_each_block(span_lo, span_hi, page_size, pages, [&](int64_t kpos, int64_t page, int64_t off, int64_t n, int64_t next, int64_t next_off) {
        if (next >= 0) prefetch_rows(key_block(next, next_off), ks[1] * sizeof(T), dk * sizeof(T));
        transpose_block32(reinterpret_cast<const uint32_t*>(key_block(page, off)), ks[1] / 2, n, np, kt2);
        float* sc = scores + kpos - span_lo;
        for_row_tiles(nq, [&](auto nr, int64_t r0) {
          score_rows_bf16<decltype(nr)::value>(q2 + r0 * np, np, kt2, scale, sc + r0 * ld, ld);
        });
      });
      scored = true;
    }
  }
#endif
  if (!scored) {
    float* qf = Scratch::at_least(s.q, nq * dk);  // scaled float queries
    for (int64_t row = 0; row < nq; ++row) {
      const T* src = q_row(row);
      for (int64_t d = 0; d < dk; ++d) qf[row * dk + d] = static_cast<float>(src[d]) * scale;
    }
    for_each_block(span_lo, span_hi, page_size, pages, [&](int64_t kpos, int64_t page, int64_t off, int64_t n, int64_t next, int64_t next_off) {
      if (next >= 0) prefetch_rows(key_block(next, next_off), ks[1] * sizeof(T), dk * sizeof(T));
      transpose_keys(key_block(page, off), ks[1], n, dk, kt);
      float* sc = scores + kpos - span_lo;
      for_row_tiles(nq, [&](auto nr, int64_t r0) {
        score_rows<decltype(nr)::value>(qf + r0 * dk, dk, kt, sc + r0 * ld, ld);
      });
    });
  }
  // softmax per row over its own window [a, b]; weights outside it are zero
  for (int64_t row = 0; row < nq; ++row) {
    const int64_t pos = pos_first + row / group, a = lo_of(pos) - span_lo, b = pos - span_lo;
    float* sc = scores + row * ld;
    const float mx = row_max(sc + a, b - a + 1);
    exp_shifted(sc + a, b - a + 1, mx);  // reaches past b: scratch or zeroed below
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t x = a; x <= b; ++x) sum += sc[x];
    const float inv = 1.f / sum;
    std::fill(sc, sc + a, 0.f);
#pragma omp simd
    for (int64_t x = a; x <= b; ++x) sc[x] *= inv;
    std::fill(sc + b + 1, sc + span, 0.f);
  }
  // weighted sum of values, each block of value rows read once for all query rows
  auto value_block = [&](int64_t page, int64_t off) { return vc + page * vs[0] + off * vs[1] + h * vs[2]; };
  for_each_block(span_lo, span_hi, page_size, pages, [&](int64_t kpos, int64_t page, int64_t off, int64_t n, int64_t next, int64_t next_off) {
    if (next >= 0) prefetch_rows(value_block(next, next_off), vs[1] * sizeof(T), dv * sizeof(T));
    const T* v0 = value_block(page, off);
    const float* w = scores + kpos - span_lo;
    for_row_tiles(nq, [&](auto nr, int64_t r0) {
      accumulate_rows<decltype(nr)::value>(w + r0 * ld, ld, v0, vs[1], n, dv, acc + r0 * dv);
    });
  });
  for (int64_t row = 0; row < nq; ++row) {
    T* dst = out + ((it.t_begin + row / group) * hq + h * group + row % group) * dv;
    for (int64_t d = 0; d < dv; ++d) dst[d] = static_cast<T>(acc[row * dv + d]);
  }
}

}  // namespace

namespace {

// paged_attention, leaving the output rows of sequences with skip[b] set unwritten
at::Tensor paged_attention_into(const at::Tensor& q_in, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& page_table_in,
                                const at::Tensor& query_start_in,
                                const at::Tensor& context_lens_in, double scale, int64_t window,
                                const std::vector<char>* skip) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_attention: q [T, Hq, Dk], caches [P, S, Hkv, D]");
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU only");
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() &&
                  v_cache.scalar_type() == q_in.scalar_type(),
              "paged_attention: q and caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_attention: cache rows must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q_in.size(2), "paged_attention: key and query sizes differ");
  // q may be a view of fused qkv rows: any token and head strides, contiguous head dims
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor table = page_table_in.to(at::kLong).contiguous();
  const at::Tensor qstart = query_start_in.to(at::kLong).contiguous();
  const at::Tensor ctx = context_lens_in.to(at::kLong).contiguous();
  const int64_t num_seqs = ctx.size(0), hq = q.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(hq % hkv == 0, "paged_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(qstart.size(0) == num_seqs + 1 && table.size(0) == num_seqs,
              "paged_attention: one page-table row and query range per sequence");
  const int64_t group = hq / hkv, page_size = k_cache.size(1), max_pages = table.size(1);
  const int64_t* qs = qstart.data_ptr<int64_t>();
  const int64_t* cl = ctx.data_ptr<int64_t>();
  std::vector<Item> items;
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t len = qs[b + 1] - qs[b];
    TORCH_CHECK(len <= cl[b] && (cl[b] + page_size - 1) / page_size <= max_pages,
                "paged_attention: sequence ", b, " does not fit its context or page table");
    if (skip != nullptr && (*skip)[b]) continue;
    for (int64_t t = qs[b]; t < qs[b + 1]; t += kQueryBlock) {
      const int64_t end = std::min(t + kQueryBlock, qs[b + 1]);
      const int64_t last_pos = cl[b] - len + (end - qs[b]) - 1;
      for (int64_t h = 0; h < hkv; ++h) items.push_back({b, h, t, end, (end - t) * (last_pos + 1)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  at::Tensor out = at::empty({q.size(0), hq, v_cache.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_attention", [&] {
    const int64_t ks[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
    const int64_t vs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t* tp = table.data_ptr<int64_t>();
    const int64_t n = static_cast<int64_t>(items.size());
    std::atomic<int64_t> next{0};
    const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      Scratch scratch;
      for (int64_t i = next++; i < n; i = next++) {
        const Item& it = items[i];
        const int64_t len = qs[it.seq + 1] - qs[it.seq];
        const int64_t pos_first = cl[it.seq] - len + (it.t_begin - qs[it.seq]);
        run_item<scalar_t>(it, qp, q.stride(0), q.stride(1), hq, kp, vp, ks, vs, page_size,
                           q.size(2), v_cache.size(3), tp + it.seq * max_pages, pos_first, group, static_cast<float>(scale),
                           window, op, scratch);
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& page_table,
                           const at::Tensor& query_start, const at::Tensor& context_lens,
                           double scale, int64_t window) {
  return paged_attention_into(q, k_cache, v_cache, page_table, query_start, context_lens, scale,
                              window, nullptr);
}

namespace {

// bf16 prefill chunks with no cached context and at least this many tokens run through
// torch's flash SDPA (AMX/AVX-512 GEMMs over blocks: about 1.5x this kernel at 512
// tokens); shorter ones, cached context, windows and float32 stay in the kernel
constexpr int64_t kFlashMinTokens = 64;

// dst[slot_mapping[t]] = src[t] for the rows [T, H, D] of one cache [P, S, H, D].
template <typename T>
void write_rows(const at::Tensor& src, const at::Tensor& cache, const int64_t* slots) {
  const int64_t heads = cache.size(2), dim = cache.size(3), page_size = cache.size(1);
  const T* sp = src.data_ptr<T>();
  T* cp = cache.data_ptr<T>();
  for (int64_t t = 0; t < src.size(0); ++t) {
    const int64_t page = slots[t] / page_size, off = slots[t] % page_size;
    for (int64_t h = 0; h < heads; ++h)
      std::copy_n(sp + t * src.stride(0) + h * src.stride(1), dim,
                  cp + page * cache.stride(0) + off * cache.stride(1) + h * cache.stride(2));
  }
}

void check_rows(const at::Tensor& src, const at::Tensor& cache, const char* name) {
  TORCH_CHECK(src.dim() == 3 && src.size(1) == cache.size(2) && src.size(2) == cache.size(3) &&
                  src.stride(2) == 1 && src.scalar_type() == cache.scalar_type(),
              "cached_attention: ", name, " must be [T, Hkv, D] rows of the cache's dtype");
}

}  // namespace

// Writes k_new (and v_new; None: the values are a view of the key rows, MLA's latent)
// [T, Hkv, D] at slot_mapping [T], then paged_attention over the updated caches.
at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k_new,
                            const std::optional<at::Tensor>& v_new, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& slot_mapping_in,
                            const at::Tensor& page_table, const at::Tensor& query_start,
                            const at::Tensor& context_lens, double scale, int64_t window) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, "cached_attention: caches [P, S, Hkv, D]");
  const at::Tensor slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(slot_mapping.numel() == k_new.size(0), "cached_attention: one slot per new token");
  for (int64_t t = 0; t < slot_mapping.numel(); ++t)
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "cached_attention: slot ", slots[t],
                " is outside the cache of ", num_slots, " slots");
  check_rows(k_new, k_cache, "k_new");
  const bool has_v = v_new.has_value() && v_new->defined();
  if (has_v) check_rows(*v_new, v_cache, "v_new");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_cache.scalar_type(), "kv_write", [&] {
    write_rows<scalar_t>(k_new, k_cache, slots);
    if (has_v) write_rows<scalar_t>(*v_new, v_cache, slots);
  });
  // fresh bf16 prefill chunks: their keys and values are exactly k_new/v_new's rows
  const at::Tensor qstart = query_start.to(at::kLong).contiguous();
  const at::Tensor ctx = context_lens.to(at::kLong).contiguous();
  const int64_t* qs = qstart.data_ptr<int64_t>();
  const int64_t* cl = ctx.data_ptr<int64_t>();
  std::vector<char> flash(ctx.size(0), 0);
  bool any_flash = false;
  if (q.scalar_type() == at::kBFloat16 && has_v && window <= 0 && q.dim() == 3 &&
      q.size(2) == v_cache.size(3) && qstart.size(0) == ctx.size(0) + 1) {
    for (int64_t b = 0; b < ctx.size(0); ++b) {
      const int64_t len = qs[b + 1] - qs[b];
      flash[b] = len >= kFlashMinTokens && cl[b] == len;
      any_flash |= flash[b] != 0;
    }
  }
  at::Tensor out = paged_attention_into(q, k_cache, v_cache, page_table, qstart, ctx, scale,
                                        window, any_flash ? &flash : nullptr);
  for (int64_t b = 0; any_flash && b < ctx.size(0); ++b) {
    if (!flash[b]) continue;
    const int64_t first = qs[b], len = qs[b + 1] - qs[b];
    auto heads_first = [&](const at::Tensor& t) {  // [len, H, D] -> [1, H, len, D]
      return t.narrow(0, first, len).transpose(0, 1).unsqueeze(0);
    };
    const at::Tensor o = at::scaled_dot_product_attention(
        heads_first(q), heads_first(k_new), heads_first(*v_new), std::nullopt, 0.0,
        /*is_causal=*/true, scale, /*enable_gqa=*/q.size(1) != k_new.size(1));
    out.narrow(0, first, len).copy_(o[0].transpose(0, 1));
  }
  return out;
}

// cached_attention's schema does not declare its cache writes (as vLLM's attention op):
// no other op of a compiled graph reads the caches, so the compiler must neither copy nor reorder them,
// and declaring the mutation would make functionalization clone every cache each step.
TORCH_LIBRARY_FRAGMENT(shoal, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
        "Tensor query_start, Tensor context_lens, float scale, int window) -> Tensor");
  m.def("cached_attention(Tensor q, Tensor k_new, Tensor? v_new, Tensor k_cache, "
        "Tensor v_cache, Tensor slot_mapping, Tensor page_table, Tensor query_start, "
        "Tensor context_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(shoal, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("cached_attention", &cached_attention);
}
