// CPU convolution with kernel 3 and stride 2 (the conv extractor's second to fifth blocks) on channels-last
// activations, followed by the block's LayerNorm (optional) and exact GELU, for feature extraction.
//
// Fewer multiplications: y[t] = x[2t] W0 + x[2t+1] W1 + x[2t+2] W2 (W_j the (in, out) tap matrices). With
// the even rows E[t] = x[2t] and the odd rows O[t] = x[2t+1], y[t] = O[t] W1 + (E[t] W0 + E[t+1] W2). The
// odd part is one GEMM over all outputs. The even part is a two-tap correlation, which Winograd's minimal
// filtering F(3, 2) (points 0, 1, -1, infinity) computes for three outputs with four products instead of
// six: with d_j = E[3i + j],
//   m0 = (d0 - d2) W0,  m1 = (d1 + d2) (W0 + W2) / 2,  m2 = (d2 - d1) (W0 - W2) / 2,  m3 = (d3 - d1) W2,
//   y[3i] += m0 + m1 + m2,  y[3i+1] += m1 - m2,  y[3i+2] += m1 + m2 + m3,
// so 7 (rows, in) x (in, out) products per three outputs instead of 9. The transforms are additions and
// subtractions (the halves are in the weights, exact); the result equals the direct sum within 1e-5.
//
// Tiles run in chunks (512 tiles, 1536 outputs): the chunk's GEMMs use every thread (BLAS), its transforms
// are split among the threads, and the scratch of one chunk (transformed inputs and products, 4 MB each at
// 512 channels) is reused by the next, so a long input allocates no more than a short one. The output
// transform also adds the conv bias and applies the LayerNorm and the GELU while the rows are in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "norm_gelu.h"
#include "parallel.h"

namespace spidr::cpu {
namespace {

constexpr int64_t kTilesPerChunk = 512;

// The input transform of F(3, 2) for `count` tiles: from the even rows d_j = E[3i + j] = x[6i + 2j]
// (j = 0..3) of tile i, v0 = d0 - d2, v1 = d1 + d2, v2 = d2 - d1, v3 = d3 - d1, each into its own (count,
// C_in) matrix of v (4, rows, C_in).
SPIDR_CLONES void input_transform(const float* __restrict x, int64_t first_row, int64_t count, int64_t C_in,
                                  float* __restrict v, int64_t v_rows) {
  for (int64_t i = 0; i < count; ++i) {
    const float* d0 = x + (first_row + 6 * i) * C_in;
    const float* d1 = d0 + 2 * C_in;
    const float* d2 = d0 + 4 * C_in;
    const float* d3 = d0 + 6 * C_in;
    float* v0 = v + i * C_in;
    float* v1 = v0 + v_rows * C_in;
    float* v2 = v1 + v_rows * C_in;
    float* v3 = v2 + v_rows * C_in;
    for (int64_t c = 0; c < C_in; c += kLanes) {
      const Vec a = load(d1 + c), b = load(d2 + c);
      store(v0 + c, load(d0 + c) - b);
      store(v1 + c, a + b);
      store(v2 + c, b - a);
      store(v3 + c, load(d3 + c) - a);
    }
  }
}

// row = gelu(norm(row + conv_bias)) in place, for one output row of C floats (norm: the LayerNorm when
// normalize, else none; conv_bias may be null).
__attribute__((always_inline)) inline void finish_row(float* row, int64_t C, const float* __restrict conv_bias,
                                                     bool normalize, const float* __restrict weight,
                                                     const float* __restrict bias, float eps) {
  if (conv_bias != nullptr) {
    for (int64_t c = 0; c < C; c += kLanes) store(row + c, load(row + c) + load(conv_bias + c));
  }
  if (normalize) {
    norm_gelu_row(row, row, C, weight, bias, eps);
  } else {
    for (int64_t c = 0; c < C; c += kLanes) store(row + c, gelu(load(row + c)));
  }
}

// The output transform for `count` tiles, and the chunk's end: y rows 3i, 3i + 1, 3i + 2 (holding the odd
// rows' products O W1) receive m0 + m1 + m2, m1 - m2 and m1 + m2 + m3 (m (4, rows, C)), then the conv bias,
// the LayerNorm (when normalize) and the GELU, in place.
SPIDR_CLONES void output_transform(float* __restrict y, const float* __restrict m, int64_t count, int64_t m_rows,
                                   int64_t C, const float* __restrict conv_bias, bool normalize,
                                   const float* __restrict weight, const float* __restrict bias, float eps) {
  for (int64_t i = 0; i < count; ++i) {
    float* y0 = y + 3 * i * C;
    float* y1 = y0 + C;
    float* y2 = y1 + C;
    const float* m0 = m + i * C;
    const float* m1 = m0 + m_rows * C;
    const float* m2 = m1 + m_rows * C;
    const float* m3 = m2 + m_rows * C;
    for (int64_t c = 0; c < C; c += kLanes) {
      const Vec s = load(m1 + c) + load(m2 + c);
      Vec a = load(y0 + c) + load(m0 + c) + s;
      Vec b = load(y1 + c) + (load(m1 + c) - load(m2 + c));
      Vec d = load(y2 + c) + s + load(m3 + c);
      if (conv_bias != nullptr) {
        const Vec cb = load(conv_bias + c);
        a += cb;
        b += cb;
        d += cb;
      }
      store(y0 + c, a);
      store(y1 + c, b);
      store(y2 + c, d);
    }
    for (float* row : {y0, y1, y2}) finish_row(row, C, nullptr, normalize, weight, bias, eps);
  }
}

at::Tensor conv_k3s2_gelu_cpu(const at::Tensor& x, const at::Tensor& taps, const std::optional<at::Tensor>& conv_bias,
                              bool normalize, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, double eps) {
  check_cpu(x, "x");
  check_cpu(taps, "taps");
  TORCH_CHECK(x.scalar_type() == at::kFloat && taps.scalar_type() == at::kFloat,
              "x and taps must be float32, got ", x.scalar_type(), " and ", taps.scalar_type());
  TORCH_CHECK(x.dim() == 3, "x must be (batch, frames, in_channels), got shape ", x.sizes());
  const int64_t B = x.size(0), T_in = x.size(1), C_in = x.size(2);
  TORCH_CHECK(taps.dim() == 3 && taps.size(0) == 5 && taps.size(1) == C_in,
              "taps must be (5, in_channels=", C_in,
              ", out_channels): W1, W0, (W0 + W2) / 2, (W0 - W2) / 2 and W2, got shape ", taps.sizes());
  const int64_t C = taps.size(2);
  TORCH_CHECK(C > 0 && C % kLanes == 0 && C_in % kLanes == 0,
              "in and out channels must be positive multiples of 16, got ", C_in, " and ", C);
  TORCH_CHECK(T_in >= 3, "x has ", T_in, " frames, fewer than the kernel's 3");
  TORCH_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);
  const auto param = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    check_cpu(*t, name);
    TORCH_CHECK(t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, name, " must be (out_channels=", C, ",), got shape ",
                t->sizes());
    return t->contiguous();
  };
  const auto cb = param(conv_bias, "conv_bias"), w = param(weight, "weight"), b = param(bias, "bias");
  const float* cbp = cb.defined() ? cb.data_ptr<float>() : nullptr;
  const float* wp = w.defined() ? w.data_ptr<float>() : nullptr;
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);

  // The op has no autograd (extraction only): its inner ATen calls run below autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor input = x.contiguous();
  const at::Tensor tp = taps.contiguous();
  const at::Tensor W1 = tp[0], W0 = tp[1], W2 = tp[4];
  const int64_t T_out = (T_in - 3) / 2 + 1, tiles = T_out / 3;
  at::Tensor out = at::empty({B, T_out, C}, x.options());

  // Scratch for one chunk of tiles: the transformed inputs v (4, chunk, C_in) and products m (4, chunk, C).
  const int64_t chunk = std::min(kTilesPerChunk, tiles);
  at::Tensor v = at::empty({4, std::max<int64_t>(chunk, 1), C_in}, x.options());
  at::Tensor m = at::empty({4, std::max<int64_t>(chunk, 1), C}, x.options());
  float* vp = v.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  for (int64_t bi = 0; bi < B; ++bi) {
    const at::Tensor xb = input[bi];
    const at::Tensor yb = out[bi];
    const float* xp = xb.data_ptr<float>();
    for (int64_t i0 = 0; i0 < tiles; i0 += chunk) {
      const int64_t k = std::min(chunk, tiles - i0), t0 = 3 * i0;
      at::Tensor y = yb.narrow(0, t0, 3 * k);
      // The odd rows' products, in output order: x[2t + 1] W1 for the chunk's 3k outputs.
      at::mm_out(y, xb.slice(0, 2 * t0 + 1, 2 * (t0 + 3 * k - 1) + 2, 2), W1);
      at::parallel_for(0, k, 32, [&](int64_t first, int64_t last) {
        input_transform(xp, 2 * t0 + 6 * first, last - first, C_in, vp + first * C_in, chunk);
      });
      for (int64_t j = 0; j < 4; ++j) {
        at::Tensor mj = m[j].narrow(0, 0, k);
        at::mm_out(mj, v[j].narrow(0, 0, k), tp[j + 1]);
      }
      float* yp = y.data_ptr<float>();
      at::parallel_for(0, k, 8, [&](int64_t first, int64_t last) {
        output_transform(yp + 3 * first * C, mp + first * C, last - first, chunk, C, cbp, normalize, wp, bp, e);
      });
    }
    for (int64_t t = 3 * tiles; t < T_out; ++t) {  // the rows after the last whole tile: the direct sum
      at::Tensor row = yb.narrow(0, t, 1);
      at::mm_out(row, xb.narrow(0, 2 * t, 1), W0);
      row.addmm_(xb.narrow(0, 2 * t + 1, 1), W1);
      row.addmm_(xb.narrow(0, 2 * t + 2, 1), W2);
      finish_row(row.data_ptr<float>(), C, cbp, normalize, wp, bp, e);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(spidr, CPU, m) { m.impl("conv_k3s2_gelu", &conv_k3s2_gelu_cpu); }

}  // namespace spidr::cpu
