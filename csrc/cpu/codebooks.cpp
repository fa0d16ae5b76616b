// CPU kernels of the codebooks: nearest-codeword assignment and per-codeword segment sums.
//
// assign_codes: rows are processed in blocks; each block is multiplied by the codebook in one BLAS
// call (every thread) into a reused (block, K) buffer, which OpenMP threads reduce at once to a
// running argmin per row, so no (N, K) distance matrix is ever written. segment_sums: when the codebooks
// divide evenly among the threads, each thread owns whole codebooks and adds their rows in order (no
// partial buffers; the result does not depend on the thread count); otherwise each thread accumulates
// its rows into its own partial (C, K, D) sums, merged at the end. No atomics either way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace spidr::cpu {
namespace {

// Accumulate one row into a partial sum. Cloned for AVX-512 / AVX2 with a run-time CPU check,
// so the loop is vectorised for the machine it runs on whatever the build flags.
SPIDR_CLONES void add_row(float* __restrict acc,
                                                                         const float* __restrict row, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += row[i];
}

SPIDR_CLONES void sum_partials(float* __restrict out,
                                                                              const float* __restrict partials,
                                                                              int64_t num_partials, int64_t stride,
                                                                              int64_t begin, int64_t end) {
  for (int64_t p = 0; p < num_partials; ++p) {
    const float* src = partials + p * stride;
    for (int64_t i = begin; i < end; ++i) out[i] += src[i];
  }
}

// argmin_k norms[k] - 2 dots[k], ties to the lowest index, in one pass that writes nothing: each of the
// 16 lanes keeps its smallest distance and the first index reaching it (a strict < over increasing k),
// then the lanes are merged (smallest distance, lowest index among equals). NaN distances never win; a
// row with no finite distance gives 0.
SPIDR_CLONES int64_t row_argmin(const float* __restrict dots, const float* __restrict norms, int64_t K) {
  const int64_t full = K / kLanes * kLanes;
  Vec best = splat(std::numeric_limits<float>::infinity());
  IVec best_k = IVec{};
  IVec k_vec = IVec{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  for (int64_t k = 0; k < full; k += kLanes) {
    const Vec d = load(norms + k) - 2.0f * load(dots + k);
    const IVec less = d < best;
    best = less ? d : best;
    best_k = less ? k_vec : best_k;
    k_vec += static_cast<int32_t>(kLanes);
  }
  float m = std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    if (best[l] < m || (best[l] == m && best_k[l] < arg)) {
      m = best[l];
      arg = best_k[l];
    }
  }
  for (int64_t k = full; k < K; ++k) {  // the tail's indices come after every lane's
    const float d = norms[k] - 2.0f * dots[k];
    if (d < m) {
      m = d;
      arg = k;
    }
  }
  return arg;
}

// One codeword: out = sums / count (a true division, as the reference computes it) and its squared norm.
SPIDR_CLONES float codeword_row(float* __restrict out, const float* __restrict sums, float count, int64_t D) {
  float norm = 0.0f;
#pragma omp simd reduction(+ : norm)
  for (int64_t d = 0; d < D; ++d) {
    const float v = sums[d] / count;
    out[d] = v;
    norm += v * v;
  }
  return norm;
}

void check_assign_args(const at::Tensor& x, const at::Tensor& codebooks, const at::Tensor& counts) {
  check_cpu(x, "x");
  check_cpu(codebooks, "codebooks");
  check_cpu(counts, "counts");
  TORCH_CHECK(x.dim() == 3, "x must be (C, N, D), got shape ", x.sizes());
  TORCH_CHECK(codebooks.dim() == 3, "codebooks must be (C, K, D), got shape ", codebooks.sizes());
  TORCH_CHECK(counts.dim() == 2, "counts must be (C, K), got shape ", counts.sizes());
  check_float_dtype(x, "x");
  TORCH_CHECK(codebooks.scalar_type() == at::kFloat, "codebooks must be float32, got ", codebooks.scalar_type());
  TORCH_CHECK(counts.scalar_type() == at::kFloat, "counts must be float32, got ", counts.scalar_type());
  TORCH_CHECK(codebooks.size(0) == x.size(0) && codebooks.size(2) == x.size(2), "codebooks must be (C=", x.size(0),
              ", K, D=", x.size(2), "), got ", codebooks.sizes());
  TORCH_CHECK(codebooks.size(1) > 0, "codebooks must hold at least one codeword");
  TORCH_CHECK(counts.size(0) == codebooks.size(0) && counts.size(1) == codebooks.size(1), "counts must be (C=",
              codebooks.size(0), ", K=", codebooks.size(1), "), got ", counts.sizes());
}

at::Tensor assign_codes_cpu(const at::Tensor& x_in, const at::Tensor& codebooks, const at::Tensor& counts) {
  check_assign_args(x_in, codebooks, counts);
  const int64_t C = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = codebooks.size(1);
  auto labels = at::empty({C, N}, x_in.options().dtype(at::kLong));
  if (N == 0) return labels;
  const auto x = x_in.detach().contiguous();
  // The codewords and their squared norms (C, K), in one pass over the codebooks.
  const auto sums = codebooks.detach().contiguous();
  const auto totals = counts.detach().contiguous();
  auto codewords = at::empty({C, K, D}, sums.options());
  auto norms = at::empty({C, K}, sums.options());
  {
    const float* sp = sums.data_ptr<float>();
    const float* tp = totals.data_ptr<float>();
    float* wp = codewords.data_ptr<float>();
    float* np = norms.data_ptr<float>();
    at::parallel_for(0, C * K, 16, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) np[i] = codeword_row(wp + i * D, sp + i * D, tp[i], D);
    });
  }
  const bool convert = x.scalar_type() != at::kFloat;
  const float* norms_ptr = norms.data_ptr<float>();
  int64_t* labels_ptr = labels.data_ptr<int64_t>();
  // A block of rows at a time: one BLAS call (all threads) into a reused (block, K) buffer, then an
  // OpenMP argmin over the block's rows while it is still in cache.
  const int64_t block = std::clamp<int64_t>((int64_t{1} << 20) / K, 64, 8192);  // a 4 MiB buffer
  auto dots = at::empty({block, K}, codewords.options());
  auto staged = convert ? at::empty({block, D}, codewords.options()) : at::Tensor();
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r0 = 0; r0 < N; r0 += block) {
      const int64_t rows = std::min(block, N - r0);
      auto xb = x.select(0, c).narrow(0, r0, rows);
      if (convert) xb = staged.narrow(0, 0, rows).copy_(xb);
      auto out = dots.narrow(0, 0, rows);
      at::mm_out(out, xb, codewords.select(0, c).t());
      float* d_ptr = out.data_ptr<float>();
      const float* nc = norms_ptr + c * K;
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) labels_ptr[c * N + r0 + r] = row_argmin(d_ptr + r * K, nc, K);
    }
  }
  return labels;
}

std::tuple<at::Tensor, at::Tensor> segment_sums_cpu(const at::Tensor& x_in, const at::Tensor& labels_in,
                                                    int64_t num_codewords) {
  check_cpu(x_in, "x");
  check_cpu(labels_in, "labels");
  TORCH_CHECK(x_in.dim() == 3, "x must be (C, N, D), got shape ", x_in.sizes());
  check_float_dtype(x_in, "x");
  TORCH_CHECK(labels_in.scalar_type() == at::kLong, "labels must be int64, got ", labels_in.scalar_type());
  TORCH_CHECK(labels_in.dim() == 2 && labels_in.size(0) == x_in.size(0) && labels_in.size(1) == x_in.size(1),
              "labels must be (C, N) = (", x_in.size(0), ", ", x_in.size(1), "), got ", labels_in.sizes());
  TORCH_CHECK(num_codewords > 0, "num_codewords must be positive, got ", num_codewords);
  const int64_t C = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = num_codewords;
  auto fopts = x_in.options().dtype(at::kFloat);
  auto count = at::zeros({C, K}, fopts);
  if (N == 0 || C == 0) return {count, at::zeros({C, K, D}, fopts)};
  const auto labels = labels_in.contiguous();
  const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < K, "labels must be in [0, ", K, "), got values in [", lo, ", ", hi, "]");
  const auto x = x_in.detach().to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  const int64_t* lp = labels.data_ptr<int64_t>();

  // A few threads saturate memory bandwidth here; more would only multiply the partial buffers.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({max_threads(), 8, (N + 63) / 64})));
  if (C % threads == 0 || C >= 4 * threads) {
    // Enough codebooks to share evenly: each thread owns whole codebooks, zeroes their sums and adds
    // their rows in order. No partial buffers, no merge, and the result does not depend on the thread
    // count.
    auto memory = at::empty({C, K, D}, fopts);
    float* out = memory.data_ptr<float>();
    float* cp = count.data_ptr<float>();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < C; ++c) {
      float* sums = out + c * K * D;
      std::fill(sums, sums + K * D, 0.0f);
      std::vector<int64_t> counts(static_cast<size_t>(K), 0);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t k = lp[c * N + n];
        ++counts[static_cast<size_t>(k)];
        add_row(sums + k * D, xp + (c * N + n) * D, D);
      }
      for (int64_t k = 0; k < K; ++k) cp[c * K + k] = static_cast<float>(counts[static_cast<size_t>(k)]);
    }
    return {count, memory};
  }
  auto memory = at::zeros({C, K, D}, fopts);
  const int64_t stride = C * K * D;
  // Thread 0 accumulates straight into the output; threads 1.. into their own partial sums.
  auto partial_sums = at::zeros({threads - 1, C, K, D}, fopts);
  std::vector<int64_t> partial_counts(static_cast<size_t>(threads) * C * K, 0);
  float* pp = partial_sums.data_ptr<float>();
  float* out = memory.data_ptr<float>();

#pragma omp parallel num_threads(threads)
  {
    const int t = thread_id();
    float* mine = t == 0 ? out : pp + (t - 1) * stride;
    int64_t* my_counts = partial_counts.data() + static_cast<size_t>(t) * C * K;
    for (int64_t c = 0; c < C; ++c) {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t k = lp[c * N + n];
        ++my_counts[c * K + k];
        add_row(mine + (c * K + k) * D, xp + (c * N + n) * D, D);
      }
    }
  }
  // Merge the other threads' partials into it, in parallel over the (C, K, D) elements, in thread order.
  if (threads > 1) {
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static)
    for (int64_t begin = 0; begin < stride; begin += chunk) {
      sum_partials(out, pp, threads - 1, stride, begin, std::min(stride, begin + chunk));
    }
  }
  float* cp = count.data_ptr<float>();
  for (int t = 0; t < threads; ++t)
    for (int64_t i = 0; i < C * K; ++i) cp[i] += static_cast<float>(partial_counts[static_cast<size_t>(t) * C * K + i]);
  return {count, memory};
}

}  // namespace

TORCH_LIBRARY_IMPL(spidr, CPU, m) {
  m.impl("assign_codes", &assign_codes_cpu);
  m.impl("segment_sums", &segment_sums_cpu);
}

}  // namespace spidr::cpu
