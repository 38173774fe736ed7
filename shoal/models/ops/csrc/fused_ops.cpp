// Fused elementwise CPU kernels of the eager forward: RMSNorm (alone, or with the residual
// add before it), rotary embedding in place (GPT-NeoX "rotate half"), SiLU(gate) * up,
// and the greedy sampler's row argmax.
//
// Each replaces a chain of eager torch ops (RMSNorm alone is eight of them: a cast, pow,
// mean, add, rsqrt, mul, a cast back and the weight's mul), so a decode step of a small
// model stops paying a dispatch and a temporary per op. Results are rounded exactly where
// the Hugging Face ops round: every intermediate that transformers stores in the model's
// dtype is rounded to it here too (round16), and this file is built with
// -ffp-contract=off so float32 products and sums are not fused into FMAs the torch ops do
// not use. Only reductions (RMSNorm's sum of squares) run in another order.
//
// Rows are split over torch's intra-op threads once a call has enough work (kGrain
// elements per thread); a decode batch stays on one thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "vec16.h"

namespace {

using namespace shoal_vec;

constexpr int64_t kGrain = 32768;  // elements per thread before a call goes parallel
constexpr int64_t kMaxHalf = 512;  // rotary dims / 2, rounded up to whole vectors

// Calls fn(vector of 16, its offset) over x[0 .. n), the tail through a zero-padded copy;
// fn returns what to store at that offset (stores of the tail are cut to its length).
template <typename T, typename Fn>
inline void map_row(const T* x, T* out, int64_t n, Fn fn) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(out + i, fn(load16(x + i), i));
  if (i < n) {
    T in[16] = {}, res[16];
    std::copy(x + i, x + n, in);
    store16(res, fn(load16(in), i));
    std::copy(res, res + (n - i), out + i);
  }
}

template <typename T>
inline vec16 load_tail(const T* p, int64_t n) {  // p[0 .. n) and zeros, n < 16
  T tmp[16] = {};
  std::copy(p, p + n, tmp);
  return load16(tmp);
}

template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  vec16 acc{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vec16 v = load16(x + i);
    acc += v * v;
  }
  if (i < n) {
    const vec16 v = load_tail(x + i, n - i);
    acc += v * v;
  }
  float s = 0.0f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// out = w * T(x * rsqrt(mean(x^2) + eps)), as transformers' LlamaRMSNorm.
template <typename T>
inline void rms_row(const T* x, const T* w, T* out, int64_t d, float eps) {
  const float r = 1.0f / std::sqrt(sum_squares(x, d) / static_cast<float>(d) + eps);
  map_row(x, out, d, [&](vec16 v, int64_t i) {
    const vec16 wv = i + 16 <= d ? load16(w + i) : load_tail(w + i, d - i);
    return wv * round16<T>(v * r);
  });
}

template <typename Fn>
inline void for_rows(int64_t rows, int64_t row_elems, Fn fn) {
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(1, row_elems));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " needs a contiguous last dimension");
}

}  // namespace

// x [N, D] or [N, H, D] (last dim contiguous, any row/head strides) -> contiguous result.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_cpu(x, "rms_norm", "x");
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "rms_norm: x must be [N, D] or [N, H, D]");
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.numel() == d && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [D] of x's dtype");
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t heads = x.dim() == 3 ? x.size(1) : 1;
  const int64_t s0 = x.stride(0), s1 = x.dim() == 3 ? x.stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_rows(x.size(0) * heads, d, [&](int64_t r) {
      const int64_t n = r / heads, h = r % heads;
      rms_row(xp + n * s0 + h * s1, wp, op + r * d, d, static_cast<float>(eps));
    });
  });
  return out;
}

// residual = T(x + residual); x = rms_norm(residual), both [N, D] contiguous, in place.
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight,
                        double eps) {
  check_cpu(x, "fused_add_rms_norm", "x");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && residual.is_contiguous() &&
                  residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: x and residual must be contiguous [N, D] of one dtype");
  const int64_t d = x.size(1);
  TORCH_CHECK(weight.numel() == d && weight.scalar_type() == x.scalar_type(),
              "fused_add_rms_norm: weight must be [D] of x's dtype");
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* rp = residual.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    for_rows(x.size(0), d, [&](int64_t r) {
      scalar_t* xr = xp + r * d;
      scalar_t* rr = rp + r * d;
      map_row(rr, rr, d, [&](vec16 v, int64_t i) {
        return v + (i + 16 <= d ? load16(xr + i) : load_tail(xr + i, d - i));
      });
      rms_row(rr, wp, xr, d, static_cast<float>(eps));
    });
  });
}

// Rotates q [T, Hq * D] and k [T, Hk * D] (last dim contiguous, any row stride) in place:
// the first R = 2 * cos.size(1) dims of every head, x1 * c - x2 * s and x2 * c + x1 * s
// with cos/sin [P, R / 2] (float32) rounded to the dtype first, as transformers does.
void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k,
                      const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  check_cpu(q, "rotary_embedding", "q");
  check_cpu(k, "rotary_embedding", "k");
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(0) == k.size(0) &&
                  positions.numel() == q.size(0) && q.scalar_type() == k.scalar_type(),
              "rotary_embedding: q [T, Hq*D], k [T, Hk*D] of one dtype, positions [T]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(),
              "rotary_embedding: cos and sin must be contiguous float32 [P, R/2] tables");
  const int64_t half = cos.size(1);
  TORCH_CHECK(half <= kMaxHalf, "rotary_embedding: at most ", 2 * kMaxHalf, " rotary dims");
  TORCH_CHECK(head_dim > 0 && 2 * half <= head_dim && q.size(1) % head_dim == 0 &&
                  k.size(1) % head_dim == 0,
              "rotary_embedding: rows must be whole heads of head_dim >= rotary dims");
  const at::Tensor pos = positions.to(at::kLong).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t table_len = cos.size(0), hq = q.size(1) / head_dim, hk = k.size(1) / head_dim;
  for (int64_t t = 0; t < pos.numel(); ++t)
    TORCH_CHECK(pp[t] >= 0 && pp[t] < table_len, "rotary_embedding: position ", pp[t],
                " is outside the cos/sin table of ", table_len);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "rotary", [&] {
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t sq = q.stride(0), sk = k.stride(0);
    for_rows(q.size(0), (hq + hk) * head_dim, [&](int64_t t) {
      float c[kMaxHalf], s[kMaxHalf];  // this token's cos/sin, rounded to the dtype
      for (int64_t i = 0; i < half; i += 16) {
        const int64_t n = std::min<int64_t>(16, half - i);
        const float* crow = cp + pp[t] * half + i;
        const float* srow = sp + pp[t] * half + i;
        store16(c + i, round16<scalar_t>(n == 16 ? load16(crow) : load_tail(crow, n)));
        store16(s + i, round16<scalar_t>(n == 16 ? load16(srow) : load_tail(srow, n)));
      }
      auto rotate = [&](scalar_t* head) {
        for (int64_t i = 0; i < half; i += 16) {
          const int64_t n = std::min<int64_t>(16, half - i);
          scalar_t* a = head + i;
          scalar_t* b = head + half + i;
          const vec16 x1 = n == 16 ? load16(a) : load_tail(a, n);
          const vec16 x2 = n == 16 ? load16(b) : load_tail(b, n);
          const vec16 cv = load16(c + i), sv = load16(s + i);
          const vec16 y1 = round16<scalar_t>(x1 * cv) - round16<scalar_t>(x2 * sv);
          const vec16 y2 = round16<scalar_t>(x2 * cv) + round16<scalar_t>(x1 * sv);
          if (n == 16) {
            store16(a, y1);
            store16(b, y2);
          } else {
            scalar_t t1[16], t2[16];
            store16(t1, y1);
            store16(t2, y2);
            std::copy(t1, t1 + n, a);
            std::copy(t2, t2 + n, b);
          }
        }
      };
      for (int64_t h = 0; h < hq; ++h) rotate(qp + t * sq + h * head_dim);
      for (int64_t h = 0; h < hk; ++h) rotate(kp + t * sk + h * head_dim);
    });
  });
}

// x [N, 2I] (gate | up, last dim contiguous, any row stride) -> T(silu(gate)) * up [N, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_cpu(x, "silu_and_mul", "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x must be [N, 2 * I]");
  const int64_t inter = x.size(1) / 2, n = x.size(0);
  at::Tensor out = at::empty({n, inter}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t stride = x.stride(0);
    for_rows(n, 2 * inter, [&](int64_t r) {
      const scalar_t* gate = xp + r * stride;
      const scalar_t* up = gate + inter;
      map_row(gate, op + r * inter, inter, [&](vec16 g, int64_t i) {
        // silu(g) = g / (1 + e^-g); e^-|g| never overflows: g >= 0 as is, g < 0 as g e / (1 + e)
        const vec16 ng = g > 0.0f ? -g : g;
        const vec16 e = exp16(ng);
        const vec16 act = g > 0.0f ? g / (1.0f + e) : g * e / (1.0f + e);
        const vec16 u = i + 16 <= inter ? load16(up + i) : load_tail(up + i, inter - i);
        return round16<scalar_t>(act) * u;
      });
    });
  });
  return out;
}

// Index of each row's maximum of x [N, V] float32 (the first one; a NaN counts as the
// maximum, as torch.argmax): 16 lanes keep their best value and index in one pass.
at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) > 0 && x_in.scalar_type() == at::kFloat &&
                  x_in.device().is_cpu(),
              "argmax_rows: x must be a non-empty float32 [N, V] CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), vocab = x.size(1);
  at::Tensor out = at::empty({n}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  for_rows(n, vocab, [&](int64_t r) {
    const float* row = xp + r * vocab;
    vec16 best = splat16(row[0]);
    i32x16 best_at{}, at_lane;
    for (int j = 0; j < 16; ++j) at_lane[j] = j;
    i32x16 nan{};
    int64_t i = 0;
    for (; i + 16 <= vocab; i += 16, at_lane += 16) {
      const vec16 v = load16(row + i);
      nan |= v != v;
      const i32x16 better = v > best;
      best = better ? v : best;
      best_at = better ? at_lane : best_at;
    }
    float m = best[0];
    int64_t arg = best_at[0];
    for (int j = 1; j < 16; ++j)
      if (best[j] > m || (best[j] == m && best_at[j] < arg)) m = best[j], arg = best_at[j];
    bool has_nan = false;
    for (int j = 0; j < 16; ++j) has_nan |= nan[j] != 0;
    for (; i < vocab; ++i) {
      has_nan |= row[i] != row[i];
      if (row[i] > m) m = row[i], arg = i;
    }
    if (has_nan)
      for (arg = 0; row[arg] == row[arg]; ++arg) {
      }
    op[r] = arg;
  });
  return out;
}

// ---- the decoder-layer loop ------------------------------------------------------------
//
// Every layer of a Llama-layout dense model (tp = 1) in one call: the same ops, in the
// same order, as the modules' eager forward (shoal/models/llama.py), without the ~15
// Python-level calls per layer between them. Linears run through oneDNN's prepacked
// bf16 path (mkldnn::_linear_pointwise, as shoal/parallel/linear.py) or at::linear, and
// attention through shoal::cached_attention (the other kernel library), both found
// in the dispatcher.

namespace {

at::Tensor run_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                      bool packed) {
  if (!packed) return at::linear(x, w, b);
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack;
  stack.reserve(6);
  stack.emplace_back(x.contiguous());
  stack.emplace_back(w);
  stack.emplace_back(b.has_value() ? c10::IValue(*b) : c10::IValue());
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

std::optional<at::Tensor> item(const c10::List<std::optional<at::Tensor>>& list, size_t i) {
  std::optional<at::Tensor> t = list.get(i);
  return t.has_value() && t->defined() ? t : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decoder_layers(
    const at::Tensor& hidden_in, const std::optional<at::Tensor>& residual_in,
    const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
    at::TensorList input_norm, at::TensorList post_norm, at::TensorList qkv_w,
    const c10::List<std::optional<at::Tensor>>& qkv_b, at::TensorList o_w,
    const c10::List<std::optional<at::Tensor>>& o_b, at::TensorList gate_up_w,
    const c10::List<std::optional<at::Tensor>>& gate_up_b, at::TensorList down_w,
    const c10::List<std::optional<at::Tensor>>& down_b,
    const c10::List<std::optional<at::Tensor>>& q_norm,
    const c10::List<std::optional<at::Tensor>>& k_norm, at::TensorList k_cache,
    at::TensorList v_cache, at::IntArrayRef windows, const at::Tensor& slot_mapping,
    const at::Tensor& page_table, const at::Tensor& query_start, const at::Tensor& context_lens,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale, double eps,
    bool packed) {
  const size_t layers = input_norm.size();
  TORCH_CHECK(post_norm.size() == layers && qkv_w.size() == layers && qkv_b.size() == layers &&
                  o_w.size() == layers && o_b.size() == layers && gate_up_w.size() == layers &&
                  gate_up_b.size() == layers && down_w.size() == layers &&
                  down_b.size() == layers && q_norm.size() == layers &&
                  k_norm.size() == layers && k_cache.size() == layers &&
                  v_cache.size() == layers && windows.size() == layers,
              "decoder_layers: one entry per layer in every list");
  TORCH_CHECK(hidden_in.dim() == 2 && hidden_in.size(0) > 0,
              "decoder_layers: hidden must be a non-empty [T, H]");
  static const auto attend =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("shoal::cached_attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                            int64_t)>();
  const int64_t tokens = hidden_in.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor hidden = hidden_in;
  at::Tensor residual = residual_in.has_value() ? *residual_in : at::Tensor();
  for (size_t l = 0; l < layers; ++l) {
    if (!residual.defined()) {
      residual = hidden;
      hidden = rms_norm(hidden, input_norm[l], eps);
    } else {
      fused_add_rms_norm(hidden, residual, input_norm[l], eps);
    }
    const at::Tensor qkv = run_linear(hidden, qkv_w[l], item(qkv_b, l), packed);
    at::Tensor q = qkv.narrow(1, 0, q_size);
    at::Tensor k = qkv.narrow(1, q_size, kv_size);
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size);
    if (const auto qn = item(q_norm, l)) {  // Qwen3: RMSNorm over each head before RoPE
      q = rms_norm(q.view({tokens, num_heads, head_dim}), *qn, eps).view({tokens, q_size});
      k = rms_norm(k.view({tokens, num_kv_heads, head_dim}), *item(k_norm, l), eps)
              .view({tokens, kv_size});
    }
    rotary_embedding(positions, q, k, cos, sin, head_dim);
    const at::Tensor attn =
        attend.call(q.view({tokens, num_heads, head_dim}), k.view({tokens, num_kv_heads, head_dim}),
                    v.view({tokens, num_kv_heads, head_dim}), k_cache[l], v_cache[l],
                    slot_mapping, page_table, query_start, context_lens, scale, windows[l]);
    hidden = run_linear(attn.view({tokens, q_size}), o_w[l], item(o_b, l), packed);
    fused_add_rms_norm(hidden, residual, post_norm[l], eps);
    const at::Tensor gate_up = run_linear(hidden, gate_up_w[l], item(gate_up_b, l), packed);
    hidden = run_linear(silu_and_mul(gate_up), down_w[l], item(down_b, l), packed);
  }
  return {hidden, residual};
}

TORCH_LIBRARY_FRAGMENT(shoal, m) {
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, "
        "int head_dim) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("decoder_layers(Tensor hidden, Tensor? residual, Tensor positions, Tensor cos, "
        "Tensor sin, Tensor[] input_norm, Tensor[] post_norm, Tensor[] qkv_w, Tensor?[] qkv_b, "
        "Tensor[] o_w, Tensor?[] o_b, Tensor[] gate_up_w, Tensor?[] gate_up_b, Tensor[] down_w, "
        "Tensor?[] down_b, Tensor?[] q_norm, "
        "Tensor?[] k_norm, Tensor[] k_cache, Tensor[] v_cache, int[] windows, "
        "Tensor slot_mapping, Tensor page_table, Tensor query_start, Tensor context_lens, "
        "int num_heads, int num_kv_heads, int head_dim, float scale, float eps, bool packed) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(shoal, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decoder_layers", &decoder_layers);
}

// prepacked oneDNN weights among the arguments dispatch the loop to the MkldnnCPU key
TORCH_LIBRARY_IMPL(shoal, MkldnnCPU, m) { m.impl("decoder_layers", &decoder_layers); }
