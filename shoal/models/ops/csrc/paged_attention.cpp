// Paged attention on CPU that reads keys and values where they lie in the paged cache.
//
// One call covers a whole flat batch: decodes (one query token) and prefill chunks
// (several query tokens after cached context) of sequences with ragged lengths. The new
// tokens' keys/values must already be in the cache. Work items are (sequence, kv head,
// block of query tokens); the query heads of one kv head (the GQA group, or every head
// for MLA's single latent "head") share each key/value row they read. Items run largest
// first on torch's intra-op threads, taken from an atomic counter, so ragged lengths
// balance. Softmax is exact (scores, then max/exp/sum, then the weighted sum of values),
// accumulated in float32 whatever the cache dtype.
//
// Shapes: q [T, Hq, Dk]; k_cache [P, S, Hkv, Dk], v_cache [P, S, Hkv, Dv] (any strides,
// last dim contiguous: MLA passes two views of one latent cache); page_table [B, maxP];
// query_start [B + 1]; context_lens [B] (cached + new tokens). Returns [T, Hq, Dv].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kQueryBlock = 16;  // query tokens per work item of a prefill chunk

struct Item {
  int64_t seq, kv_head, t_begin, t_end, cost;  // t_*: token rows of the flat batch
};

// GCC/Clang vector extensions: 8 floats, compiled to AVX2/AVX-512/NEON or scalar code.
typedef float vec8 __attribute__((vector_size(32)));

inline vec8 load8(const float* p) {
  vec8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, vec8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

inline float hsum(vec8 v) {
  return (v[0] + v[4]) + (v[1] + v[5]) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float dot(const float* a, const float* b, int64_t n) {
  vec8 acc0 = {}, acc1 = {};  // two chains hide the FMA latency
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    acc0 += load8(a + d) * load8(b + d);
    acc1 += load8(a + d + 8) * load8(b + d + 8);
  }
  for (; d + 8 <= n; d += 8) acc0 += load8(a + d) * load8(b + d);
  float acc = hsum(acc0 + acc1);
  for (; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

inline void axpy(float w, const float* x, float* y, int64_t n) {
  const vec8 wv = {w, w, w, w, w, w, w, w};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) store8(y + d, load8(y + d) + wv * load8(x + d));
  for (; d < n; ++d) y[d] += w * x[d];
}

// exp for x <= 0 (scores minus their max), Cephes' polynomial: within 2 ulp of expf,
// written so that the compiler vectorizes it.
inline void exp_inplace(float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] < -87.0f ? -87.0f : x[i];
    const float t = v * 1.44269504088896341f;
    const int k = static_cast<int>(t - 0.5f);  // round to nearest (t <= 0)
    const float kf = static_cast<float>(k);
    v = v - kf * 0.693359375f + kf * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * v + 1.3981999507e-3f;
    p = p * v + 8.3334519073e-3f;
    p = p * v + 4.1665795894e-2f;
    p = p * v + 1.6666665459e-1f;
    p = p * v + 5.0000001201e-1f;
    p = p * v * v + v + 1.0f;
    int bits = (k + 127) << 23;
    float scale;
    __builtin_memcpy(&scale, &bits, sizeof(scale));
    x[i] = p * scale;
  }
}

template <typename T>
inline const float* as_float(const T* src, float* tmp, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t d = 0; d < n; ++d) tmp[d] = static_cast<float>(src[d]);
    return tmp;
  }
}

// Calls fn(position, page id, offset in page) for positions lo..hi, page by page.
template <typename Fn>
inline void for_each_key(int64_t lo, int64_t hi, int64_t page_size, const int64_t* pages, Fn fn) {
  for (int64_t p = lo / page_size, base = p * page_size; base <= hi; ++p, base += page_size) {
    const int64_t first = std::max<int64_t>(lo - base, 0);
    const int64_t last = std::min<int64_t>(hi - base, page_size - 1);
    const int64_t page = pages[p];
    for (int64_t off = first; off <= last; ++off) fn(base + off, page, off);
  }
}

struct Scratch {
  std::vector<float> q, scores, out, row_k, row_v, denom;
};

template <typename T>
void run_item(const Item& it, const T* q, int64_t hq, const T* kc, const T* vc,
              const int64_t ks[3], const int64_t vs[3], int64_t page_size, int64_t dk,
              int64_t dv, const int64_t* pages, int64_t pos_first, int64_t group, float scale,
              int64_t window, T* out, Scratch& s) {
  const int64_t ntok = it.t_end - it.t_begin, nq = ntok * group, h = it.kv_head;
  auto lo_of = [&](int64_t pos) { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; };
  const int64_t span_lo = lo_of(pos_first), span_hi = pos_first + ntok - 1;
  const int64_t span = span_hi - span_lo + 1;
  s.q.resize(nq * dk);
  s.scores.resize(nq * span);
  s.out.assign(nq * dv, 0.f);
  s.row_k.resize(dk);
  s.row_v.resize(dv);
  for (int64_t i = 0; i < ntok; ++i)  // scaled float queries, row = i * group + j
    for (int64_t j = 0; j < group; ++j) {
      const T* src = q + ((it.t_begin + i) * hq + h * group + j) * dk;
      float* dst = s.q.data() + (i * group + j) * dk;
      for (int64_t d = 0; d < dk; ++d) dst[d] = static_cast<float>(src[d]) * scale;
    }
  // pass 1: scores of every (row, key) in the row's window [lo_i, pos_i]
  for_each_key(span_lo, span_hi, page_size, pages, [&](int64_t kpos, int64_t page, int64_t off) {
    const float* k = as_float(kc + page * ks[0] + off * ks[1] + h * ks[2], s.row_k.data(), dk);
    for (int64_t i = 0; i < ntok; ++i) {
      const int64_t pos = pos_first + i;
      if (kpos > pos || kpos < lo_of(pos)) continue;
      for (int64_t j = 0; j < group; ++j) {
        const int64_t row = i * group + j;
        s.scores[row * span + kpos - span_lo] = dot(s.q.data() + row * dk, k, dk);
      }
    }
  });
  // softmax per row over its own window, weights left in place
  s.denom.resize(nq);
  float* denom = s.denom.data();
  for (int64_t i = 0; i < ntok; ++i) {
    const int64_t pos = pos_first + i, a = lo_of(pos) - span_lo, b = pos - span_lo;
    for (int64_t j = 0; j < group; ++j) {
      float* sc = s.scores.data() + (i * group + j) * span;
      float mx = sc[a];
      for (int64_t x = a + 1; x <= b; ++x) mx = std::max(mx, sc[x]);
      for (int64_t x = a; x <= b; ++x) sc[x] -= mx;
      exp_inplace(sc + a, b - a + 1);
      float sum = 0.f;
      for (int64_t x = a; x <= b; ++x) sum += sc[x];
      denom[i * group + j] = sum;
    }
  }
  // pass 2: weighted sum of values, each value row read once for the whole block
  for_each_key(span_lo, span_hi, page_size, pages, [&](int64_t kpos, int64_t page, int64_t off) {
    const float* v = as_float(vc + page * vs[0] + off * vs[1] + h * vs[2], s.row_v.data(), dv);
    for (int64_t i = 0; i < ntok; ++i) {
      const int64_t pos = pos_first + i;
      if (kpos > pos || kpos < lo_of(pos)) continue;
      for (int64_t j = 0; j < group; ++j) {
        const int64_t row = i * group + j;
        axpy(s.scores[row * span + kpos - span_lo], v, s.out.data() + row * dv, dv);
      }
    }
  });
  for (int64_t i = 0; i < ntok; ++i)
    for (int64_t j = 0; j < group; ++j) {
      const int64_t row = i * group + j;
      const float inv = 1.f / denom[row];
      T* dst = out + ((it.t_begin + i) * hq + h * group + j) * dv;
      const float* src = s.out.data() + row * dv;
      for (int64_t d = 0; d < dv; ++d) dst[d] = static_cast<T>(src[d] * inv);
    }
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& page_table_in,
                           const at::Tensor& query_start_in, const at::Tensor& context_lens_in,
                           double scale, int64_t window) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4,
              "paged_attention: q [T, Hq, Dk], caches [P, S, Hkv, D]");
  TORCH_CHECK(q_in.device().is_cpu() && k_cache.device().is_cpu(), "paged_attention: CPU only");
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() &&
                  v_cache.scalar_type() == q_in.scalar_type(),
              "paged_attention: q and caches must share a dtype");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_attention: cache rows must be contiguous");
  TORCH_CHECK(k_cache.size(3) == q_in.size(2), "paged_attention: key and query sizes differ");
  const at::Tensor q = q_in.contiguous();
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
        run_item<scalar_t>(it, qp, hq, kp, vp, ks, vs, page_size, q.size(2), v_cache.size(3),
                           tp + it.seq * max_pages, pos_first, group, static_cast<float>(scale),
                           window, op, scratch);
      }
    });
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(shoal, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, "
        "Tensor query_start, Tensor context_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(shoal, CPU, m) { m.impl("paged_attention", &paged_attention); }
