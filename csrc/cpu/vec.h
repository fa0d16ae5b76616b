// Sixteen-lane float vectors (GCC/Clang vector extensions) and the exp of the CPU kernels. In a function
// compiled for AVX-512 (SPIDR_CLONES) a Vec is one register; in the AVX2 and baseline clones the compiler
// splits it into two or four. Plain arithmetic, no intrinsics: the same source serves every clone.
#pragma once

#include <cstdint>
#include <type_traits>

namespace spidr::cpu {

constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec splat(float v) { return Vec{} + v; }
inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline Vec vmax(Vec a, Vec b) { return a > b ? a : b; }

// exp(x) for x <= 0 (shifted logits), within 2 ulp of expf: 2^n * p(r) with n = round(x / ln 2) (by
// adding and subtracting 1.5 * 2^23) and a degree-6 polynomial on |r| <= ln(2)/2. T is float or Vec.
template <typename T, typename I>
inline T exp_nonpositive(T x) {
  const T floor_value = T{} + -87.0f;
  x = x < floor_value ? floor_value : x;
  const T n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const T r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  T p = T{} + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  I bits;
  if constexpr (std::is_same_v<T, float>) {
    bits = (static_cast<int32_t>(n) + 127) << 23;
  } else {
    bits = (__builtin_convertvector(n, I) + 127) << 23;
  }
  T scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline float exp_nonpositive(float x) { return exp_nonpositive<float, int32_t>(x); }
inline Vec exp_nonpositive(Vec x) { return exp_nonpositive<Vec, IVec>(x); }

}  // namespace spidr::cpu
