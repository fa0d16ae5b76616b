// Exact (erf) GELU and a LayerNorm + GELU over one row, shared by the fused CPU kernels (norm_gelu.cpp,
// conv_winograd.cpp). Inline, so each kernel's ISA clones (SPIDR_CLONES) compile them for their ISA.
#pragma once

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace spidr::cpu {

// 1 / d for d >= 1 without a division (the division unit's throughput bounds these kernels otherwise): an
// initial guess from the float's bits (within 12 % on [1, inf)), then three Newton steps r = r (2 - d r),
// each squaring the relative error, to float precision.
__attribute__((always_inline)) inline Vec reciprocal(Vec d) {
  IVec bits;
  __builtin_memcpy(&bits, &d, sizeof(bits));
  bits = 0x7EF311C3 - bits;
  Vec r;
  __builtin_memcpy(&r, &bits, sizeof(r));
  r = r * (2.0f - d * r);
  r = r * (2.0f - d * r);
  r = r * (2.0f - d * r);
  return r;
}

// erf(x) for x >= 0 (Abramowitz and Stegun 7.1.26, absolute error below 1.5e-7):
// 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2) with t = 1 / (1 + p x).
__attribute__((always_inline)) inline Vec erf_nonnegative(Vec x) {
  const Vec t = reciprocal(1.0f + 0.3275911f * x);
  Vec poly = splat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  return 1.0f - poly * t * exp_nonpositive(-(x * x));
}

// gelu(y) = y / 2 * (1 + erf(y / sqrt 2)); erf is odd, so erf(y / sqrt 2) = sign(y) erf(|y| / sqrt 2).
__attribute__((always_inline)) inline Vec gelu(Vec y) {
  const Vec z = y * 0.70710678118654752f;
  const Vec e = erf_nonnegative(z < 0.0f ? -z : z);
  return 0.5f * y * (1.0f + (z < 0.0f ? -e : e));
}

// dst = gelu(layer_norm(src)) over D floats (D a multiple of 16); src and dst may be the same row. weight and
// bias (D) may be null (no affine). The mean first, then the variance about it (a second pass over the row
// in L1: no cancellation of E[x^2] - E[x]^2), then one pass that normalises and writes.
__attribute__((always_inline)) inline void norm_gelu_row(const float* src, float* dst, int64_t D,
                                                         const float* __restrict weight,
                                                         const float* __restrict bias, float eps) {
  const float inv_d = 1.0f / static_cast<float>(D);
  Vec acc = splat(0.0f);
  for (int64_t d = 0; d < D; d += kLanes) acc += load(src + d);
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
  const Vec mv = splat(sum * inv_d);
  acc = splat(0.0f);
  for (int64_t d = 0; d < D; d += kLanes) {
    const Vec c = load(src + d) - mv;
    acc += c * c;
  }
  float sq = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sq += acc[l];
  const Vec rv = splat(1.0f / std::sqrt(sq * inv_d + eps));
  for (int64_t d = 0; d < D; d += kLanes) {
    Vec y = (load(src + d) - mv) * rv;
    if (weight != nullptr) y = y * load(weight + d);
    if (bias != nullptr) y = y + load(bias + d);
    store(dst + d, gelu(y));
  }
}

}  // namespace spidr::cpu
