// CPU LayerNorm over the last dimension followed by the exact (erf) GELU, in place, in one pass over
// memory: each row is read once (mean and variance while it sits in L1, then normalised, scaled and
// passed through the GELU) and written once, where the unfused pair reads and writes the activations
// twice and allocates two outputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "norm_gelu.h"
#include "parallel.h"

namespace spidr::cpu {
namespace {

// Rows of D floats (D a multiple of 16), in place.
SPIDR_CLONES void rows_norm_gelu(float* x, int64_t rows, int64_t D, const float* __restrict weight,
                                 const float* __restrict bias, float eps) {
  for (int64_t r = 0; r < rows; ++r) norm_gelu_row(x + r * D, x + r * D, D, weight, bias, eps);
}

void layer_norm_gelu_cpu(at::Tensor& x, const std::optional<at::Tensor>& weight,
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
  if (rows == 0) return;
  float* data = x.data_ptr<float>();
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t first, int64_t last) {
    rows_norm_gelu(data + first * D, last - first, D, wp, bp, e);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(spidr, CPU, m) { m.impl("layer_norm_gelu_", &layer_norm_gelu_cpu); }

}  // namespace spidr::cpu
