// CPU masked-prediction loss: fused linear + cross-entropy by row blocks, forward and gradients in one pass.
//
// For each block of rows and each head: the block's logits by one BLAS call (all threads) into a
// reused (block, K) buffer; an OpenMP epilogue over the block's rows (online log-sum-exp, loss
// terms, softmax, and with gradients g = (softmax - onehot) * scale in place); then g is reduced at
// once into grad_h (g @ W) and grad_weight (g^T @ h) by two more BLAS calls. Three GEMMs per block
// and head, the floor of this loss: the gradients are computed in the forward pass and only scaled
// by the backward when the upstream gradient is uniform (the training case). The (N, K) logits
// never exist; one (block, K) buffer does.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"

namespace spidr::cpu {
namespace {

struct LossArgs {
  int64_t C, N, D, K;
  bool shared;
};

LossArgs check_loss_args(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias,
                         const at::Tensor& labels) {
  check_cpu(h, "h");
  check_cpu(weight, "weight");
  check_cpu(bias, "bias");
  check_cpu(labels, "labels");
  TORCH_CHECK(h.dim() == 2 || h.dim() == 3, "h must be (N, D) or (C, N, D), got shape ", h.sizes());
  TORCH_CHECK(weight.dim() == 3, "weight must be (C, K, D), got shape ", weight.sizes());
  check_float_dtype(h, "h");
  check_float_dtype(weight, "weight");
  check_float_dtype(bias, "bias");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  const int64_t C = weight.size(0), K = weight.size(1), D = weight.size(2);
  TORCH_CHECK(C > 0, "weight must hold at least one head (C > 0)");
  TORCH_CHECK(K > 0, "weight must have at least one codeword (K > 0)");
  TORCH_CHECK(h.size(-1) == D, "h must have D=", D, " features to match weight, got ", h.size(-1));
  if (h.dim() == 3) TORCH_CHECK(h.size(0) == C, "h must have C=", C, " heads, got shape ", h.sizes());
  const int64_t N = h.size(-2);
  TORCH_CHECK(bias.dim() == 2 && bias.size(0) == C && bias.size(1) == K, "bias must be (C=", C, ", K=", K, "), got ",
              bias.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == C && labels.size(1) == N, "labels must be (C=", C, ", N=", N,
              "), got ", labels.sizes());
  if (N > 0) {
    const int64_t lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "labels must be in [0, ", K, "), got values in [", lo, ", ", hi, "]");
  }
  return {C, N, D, K, h.dim() == 2};
}

struct PassOutput {
  at::Tensor loss, mean_probs, grad_h, grad_weight, grad_bias;
};

// exp(x) for x <= 0 (shifted logits), within 2 ulp of expf: 2^n * p(r) with n = round(x / ln 2) and a
// degree-6 polynomial on |r| <= ln(2)/2. Plain arithmetic, so the row loops below auto-vectorise.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

constexpr int64_t kChunk = 16;  // codewords per step of the online log-sum-exp

// The row-wise epilogue of one (rows, K) block of logits, in place: an online log-sum-exp over chunks of
// kChunk codewords (one pass: each chunk is exponentiated against the running max, and earlier chunks
// are rescaled once at the end), the loss terms, the column sums of the softmax (probs_sum) and, when
// grad_scale is given, g = (softmax - onehot) * grad_scale[row] with its column sums (grad_bias_sum).
// Cloned per instruction set and chosen at run time, so the chunk loops are vectorised.
__attribute__((target_clones("avx512f", "avx2", "default"))) void block_epilogue(
    float* __restrict logits, int64_t rows, int64_t K, const int64_t* __restrict labels,
    float* __restrict loss_terms, float* __restrict probs_sum, const float* __restrict grad_scale,
    float* __restrict grad_bias_sum, float* __restrict chunk_max) {
  const int64_t chunks = (K + kChunk - 1) / kChunk;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = logits + r * K;
    const int64_t label = labels[r];
    const float label_logit = row[label];
    float m = -std::numeric_limits<float>::infinity(), s = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) {
      float* x = row + c * kChunk;
      const int64_t w = std::min(kChunk, K - c * kChunk);
      float cm = x[0];
      for (int64_t k = 1; k < w; ++k) cm = x[k] > cm ? x[k] : cm;
      if (cm > m) {
        s *= exp_nonpositive(m - cm);
        m = cm;
      }
      float cs = 0.0f;
      for (int64_t k = 0; k < w; ++k) {
        x[k] = exp_nonpositive(x[k] - m);
        cs += x[k];
      }
      s += cs;
      chunk_max[c] = m;
    }
    // -log_softmax[label] = log(sum exp(logit - max)) - (logit[label] - max)
    loss_terms[r] = std::log(s) - (label_logit - m);
    const float inv = 1.0f / s;
    for (int64_t c = 0; c < chunks; ++c) {
      float* x = row + c * kChunk;
      const int64_t w = std::min(kChunk, K - c * kChunk);
      const float f = exp_nonpositive(chunk_max[c] - m) * inv;
      for (int64_t k = 0; k < w; ++k) x[k] *= f;
    }
    for (int64_t k = 0; k < K; ++k) probs_sum[k] += row[k];
    if (grad_scale != nullptr) {
      const float g = grad_scale[r];
      row[label] -= 1.0f;
      for (int64_t k = 0; k < K; ++k) {
        row[k] *= g;
        grad_bias_sum[k] += row[k];
      }
    }
  }
}

// One fused pass over row blocks. Each block's GEMMs use every thread (BLAS), the epilogue splits the
// block's rows across OpenMP threads. row_scale (N,) float32, when defined, multiplies each row's
// gradient (the upstream gradient); otherwise it is 1. Gradients are of sum(loss) (terms divided by C).
PassOutput fused_pass(const at::Tensor& h_in, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& labels_in, const at::Tensor& row_scale, bool want_loss, bool want_grads) {
  const LossArgs a = check_loss_args(h_in, weight, bias, labels_in);
  const auto fopts = h_in.options().dtype(at::kFloat);
  PassOutput out;
  out.loss = at::zeros({a.N}, fopts);
  out.mean_probs = at::zeros({a.C, a.K}, fopts);
  if (!want_grads) {
    out.grad_h = at::empty({0}, h_in.options());
    out.grad_weight = at::empty({0}, weight.options());
    out.grad_bias = at::empty({0}, bias.options());
  }
  // Kernels compute values only: detached inputs keep the ATen calls below out of autograd.
  const auto wf = weight.detach().to(at::kFloat).contiguous();
  const auto bf = bias.detach().to(at::kFloat).contiguous();
  if (a.N == 0) {
    if (want_grads) {
      out.grad_h = at::zeros_like(h_in);
      out.grad_weight = at::zeros_like(weight);
      out.grad_bias = at::zeros_like(bias);
    }
    return out;
  }
  const auto h = h_in.detach().contiguous();
  const auto labels = labels_in.contiguous();
  const bool convert = h.scalar_type() != at::kFloat;
  const int64_t block = std::clamp<int64_t>((int64_t{1} << 21) / a.K, 64, 16384);  // an 8 MiB logits buffer
  const int threads = max_threads();
  const float inv_heads = 1.0f / static_cast<float>(a.C);

  at::Tensor grad_h32, grad_w32, grad_b32;
  if (want_grads) {
    grad_h32 = at::empty(h.sizes(), fopts);  // every element is written by its block's first head
    grad_w32 = at::zeros({a.C, a.K, a.D}, fopts);
    grad_b32 = at::zeros({a.C, a.K}, fopts);
  }
  const auto scale = want_grads ? (row_scale.defined() ? row_scale.detach().to(at::kFloat) * inv_heads
                                                       : at::full({a.N}, inv_heads, fopts))
                                      .contiguous()
                                : at::Tensor();
  auto logits = at::empty({block, a.K}, fopts);
  auto staged = convert ? at::empty({block, a.D}, fopts) : at::Tensor();
  auto terms = at::empty({block}, fopts);
  // Per-thread column sums of the softmax and of g, merged after each block (no atomics), and
  // per-thread scratch for the running maxima of the online log-sum-exp.
  auto partial = at::zeros({threads, 2, a.K}, fopts);
  auto scratch = at::empty({threads, (a.K + kChunk - 1) / kChunk}, fopts);
  float* loss_ptr = out.loss.data_ptr<float>();
  float* partial_ptr = partial.data_ptr<float>();
  float* probs_ptr = out.mean_probs.data_ptr<float>();

  for (int64_t r0 = 0; r0 < a.N; r0 += block) {
    const int64_t rows = std::min(block, a.N - r0);
    auto lg = logits.narrow(0, 0, rows);
    for (int64_t i = 0; i < a.C; ++i) {
      auto hb = (a.shared ? h : h.select(0, i)).narrow(0, r0, rows);
      if (convert) hb = staged.narrow(0, 0, rows).copy_(hb);
      const auto wi = wf.select(0, i);
      at::addmm_out(lg, bf.select(0, i), hb, wi.t());
      const int64_t* lab = labels.data_ptr<int64_t>() + i * a.N + r0;
      const float* gs = want_grads ? scale.data_ptr<float>() + r0 : nullptr;
      float* lp = lg.data_ptr<float>();
      float* tp = terms.data_ptr<float>();
      partial.zero_();
#pragma omp parallel num_threads(threads)
      {
        const int t = thread_id(), nt = team_size();
        const int64_t per = (rows + nt - 1) / nt, begin = std::min(rows, t * per), end = std::min(rows, begin + per);
        float* mine = partial_ptr + t * 2 * a.K;
        block_epilogue(lp + begin * a.K, end - begin, a.K, lab + begin, tp + begin, mine,
                       gs == nullptr ? nullptr : gs + begin, mine + a.K,
                       scratch.data_ptr<float>() + t * scratch.size(1));
      }
      for (int t = 0; t < threads; ++t) {
        const float* src = partial_ptr + t * 2 * a.K;
        for (int64_t k = 0; k < a.K; ++k) probs_ptr[i * a.K + k] += src[k];
        if (want_grads) {
          float* gb = grad_b32.data_ptr<float>() + i * a.K;
          for (int64_t k = 0; k < a.K; ++k) gb[k] += src[a.K + k];
        }
      }
      if (want_loss) {
        for (int64_t r = 0; r < rows; ++r) loss_ptr[r0 + r] += tp[r];  // heads summed in order, as the release
      }
      if (want_grads) {
        auto gh = (a.shared ? grad_h32 : grad_h32.select(0, i)).narrow(0, r0, rows);
        if (a.shared && i > 0) {
          at::addmm_out(gh, gh, lg, wi);
        } else {
          at::mm_out(gh, lg, wi);
        }
        auto gw = grad_w32.select(0, i);
        at::addmm_out(gw, gw, lg.t(), hb);
      }
    }
  }
  if (want_loss) out.loss.mul_(inv_heads);
  out.mean_probs.div_(static_cast<float>(a.N));
  if (want_grads) {
    out.grad_h = grad_h32.to(h_in.scalar_type());
    out.grad_weight = grad_w32.to(weight.scalar_type());
    out.grad_bias = grad_b32.to(bias.scalar_type());
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mpl_forward_cpu(const at::Tensor& h,
                                                                                     const at::Tensor& weight,
                                                                                     const at::Tensor& bias,
                                                                                     const at::Tensor& labels,
                                                                                     bool compute_grads) {
  auto out = fused_pass(h, weight, bias, labels, at::Tensor(), /*want_loss=*/true, compute_grads);
  return {out.loss, out.mean_probs, out.grad_h, out.grad_weight, out.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mpl_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& h,
                                                                const at::Tensor& weight, const at::Tensor& bias,
                                                                const at::Tensor& labels, const at::Tensor& grad_h,
                                                                const at::Tensor& grad_weight,
                                                                const at::Tensor& grad_bias) {
  const LossArgs a = check_loss_args(h, weight, bias, labels);
  check_cpu(grad_loss, "grad_loss");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == a.N, "grad_loss must be (N=", a.N, ",), got ",
              grad_loss.sizes());
  TORCH_CHECK(at::isFloatingType(grad_loss.scalar_type()), "grad_loss must be floating point, got ",
              grad_loss.scalar_type());
  // The saved gradients count when all three have the shapes of h, weight and bias (mpl_forward returns
  // empty (0,) tensors instead when it did not compute them).
  const bool saved = grad_h.sizes() == h.sizes() && grad_weight.sizes() == weight.sizes() &&
                     grad_bias.sizes() == bias.sizes();
  if (saved) {
    check_cpu(grad_h, "grad_h");
    check_cpu(grad_weight, "grad_weight");
    check_cpu(grad_bias, "grad_bias");
    TORCH_CHECK(grad_h.scalar_type() == h.scalar_type() && grad_weight.scalar_type() == weight.scalar_type() &&
                    grad_bias.scalar_type() == bias.scalar_type(),
                "the saved gradients must have the dtypes of h, weight and bias");
  }
  if (saved && grad_loss.numel() > 0) {
    const auto g = grad_loss.detach().to(at::kFloat);
    const float first = g[0].item<float>();
    if (at::equal(g, at::full_like(g, first))) {  // uniform upstream gradient: scale the saved gradients
      return {grad_h.detach() * first, grad_weight.detach() * first, grad_bias.detach() * first};
    }
  } else if (saved) {
    return {grad_h.detach().clone(), grad_weight.detach().clone(), grad_bias.detach().clone()};
  }
  auto out = fused_pass(h, weight, bias, labels, grad_loss, /*want_loss=*/false, /*want_grads=*/true);
  return {out.grad_h, out.grad_weight, out.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(spidr, CPU, m) {
  m.impl("mpl_forward", &mpl_forward_cpu);
  m.impl("mpl_backward", &mpl_backward_cpu);
}

}  // namespace spidr::cpu
