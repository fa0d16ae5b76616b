// CPU LayerNorm over the last dimension followed by the exact (erf) GELU, in place, in one pass over
// memory: each row is read once (mean and variance while it sits in L1, then normalised, scaled and
// passed through the GELU) and written once, where the unfused pair reads and writes the activations
// twice and allocates two outputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "parallel.h"
#include "vec.h"

namespace spidr::cpu {
namespace {

// 1 / d for d >= 1 without a division (the division unit's throughput bounds this kernel otherwise): an
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

// Rows of D floats (D a multiple of 16), in place.
SPIDR_CLONES void rows_norm_gelu(float* __restrict x, int64_t rows, int64_t D, const float* __restrict weight,
                                 const float* __restrict bias, float eps) {
  const float inv_d = 1.0f / static_cast<float>(D);
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = x + r * D;
    Vec acc = splat(0.0f);
    for (int64_t d = 0; d < D; d += kLanes) acc += load(row + d);
    float sum = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
    const Vec mv = splat(sum * inv_d);
    // The variance about the mean (a second pass over the row in L1: no cancellation of E[x^2] - E[x]^2).
    acc = splat(0.0f);
    for (int64_t d = 0; d < D; d += kLanes) {
      const Vec c = load(row + d) - mv;
      acc += c * c;
    }
    float sq = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) sq += acc[l];
    const Vec rv = splat(1.0f / std::sqrt(sq * inv_d + eps));
    for (int64_t d = 0; d < D; d += kLanes) {
      Vec y = (load(row + d) - mv) * rv;
      if (weight != nullptr) y = y * load(weight + d);
      if (bias != nullptr) y = y + load(bias + d);
      store(row + d, gelu(y));
    }
  }
}

at::Tensor& layer_norm_gelu_cpu(at::Tensor& x, const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps) {
  check_cpu(x, "x");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) % kLanes == 0,
              "x's last dimension must be a positive multiple of 16, got shape ", x.sizes());
  TORCH_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);
  const int64_t D = x.size(-1);
  const auto param = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    check_cpu(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == D, name, " must be (D=", D, ",), got shape ", t->sizes());
    return t->contiguous();
  };
  const auto w = param(weight, "weight"), b = param(bias, "bias");
  const int64_t rows = x.numel() / D;
  if (rows == 0) return x;
  float* data = x.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t first, int64_t last) {
    rows_norm_gelu(data + first * D, last - first, D, wp, bp, e);
  });
  return x;
}

}  // namespace

TORCH_LIBRARY_IMPL(spidr, CPU, m) { m.impl("layer_norm_gelu_", &layer_norm_gelu_cpu); }

}  // namespace spidr::cpu
