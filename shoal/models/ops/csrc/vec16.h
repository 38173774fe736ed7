// 16-float vectors for shoal's CPU kernels (GCC/Clang vector extensions: AVX-512, 2x AVX2,
// NEON or scalar code from one source), with bf16 loads and stores and a vector exp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace shoal_vec {

// GCC/Clang vector extensions: 16 floats, compiled to AVX-512, 2x AVX2, NEON or scalar.
typedef float vec16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline vec16 load16(const float* p) {
  vec16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, vec16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

inline vec16 splat16(float x) { return vec16{} + x; }

// 16 bfloat16 values to float: each one is the high half of its float's bits.
inline vec16 load16(const c10::BFloat16* p) {
#ifdef __AVX512F__
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vec16)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  u16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  vec16 v;
  __builtin_memcpy(&v, &w, sizeof(v));
  return v;
#endif
}

template <typename T>
inline vec16 load16(const T* p) {  // other dtypes (half): element by element
  vec16 v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// exp for x <= 0 (scores minus their max), Cephes' polynomial: within 2 ulp of expf.
inline vec16 exp16(vec16 x) {
  x = x < -87.0f ? splat16(-87.0f) : x;
  const i32x16 k = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, i32x16);  // round (x <= 0)
  const vec16 kf = __builtin_convertvector(k, vec16);
  const vec16 v = x - kf * 0.693359375f + kf * 2.12194440e-4f;
  vec16 p = splat16(1.9875691500e-4f);
  p = p * v + 1.3981999507e-3f;
  p = p * v + 8.3334519073e-3f;
  p = p * v + 4.1665795894e-2f;
  p = p * v + 1.6666665459e-1f;
  p = p * v + 5.0000001201e-1f;
  p = p * v * v + v + 1.0f;
  const i32x16 bits = (k + 127) << 23;
  vec16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 16 floats to bfloat16, rounded to nearest even (NaN stays NaN), as c10::BFloat16 does.
inline void store16(c10::BFloat16* p, vec16 v) {
#if defined(__AVX512BF16__)
  const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
  __builtin_memcpy(p, &h, sizeof(h));
#else
  u32x16 u;
  __builtin_memcpy(&u, &v, sizeof(u));
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u32x16 r = (u & 0x7fffffffu) > 0x7f800000u ? u32x16{} + 0x7fc0u : rounded;
  const u16x16 h = __builtin_convertvector(r, u16x16);
  __builtin_memcpy(p, &h, sizeof(h));
#endif
}

template <typename T>
inline void store16(T* p, vec16 v) {  // other dtypes (half): element by element
  for (int i = 0; i < 16; ++i) p[i] = static_cast<T>(v[i]);
}

// v as an op with a T result would store it: rounded to T and read back (float: as is).
template <typename T>
inline vec16 round16(vec16 v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    T tmp[16];
    store16(tmp, v);
    return load16(tmp);
  }
}

}  // namespace shoal_vec
