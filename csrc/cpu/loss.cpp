// CPU masked-prediction loss: fused linear + cross-entropy by row blocks, forward and gradients in one pass.
//
// For each block of rows and each head: the block's logits by one BLAS call (all threads) into a
// reused (block, K) buffer; an OpenMP epilogue over the block's rows (log-sum-exp with one exp per logit, loss
// terms, softmax, and with gradients g = (softmax - onehot) * scale in place); then g is reduced at
// once into grad_h (g @ W) and grad_weight (g^T @ h) by two more BLAS calls. Three GEMMs per block
// and head, the floor of this loss: the gradients are computed in the forward pass and only scaled
// by the backward when the upstream gradient is uniform (the training case). The (N, K) logits
// never exist; one (block, K) buffer (about 4 MiB) does. grad_h, the one large output, is mapped
// with transparent huge pages (parallel.h: empty_float_huge), which makes its first touch cheap.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"
#include "vec.h"

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

// The row-wise epilogue of one (rows, K) block of h W^T, in place. Per row, three passes over the row
// while it sits in L1: the bias added and the maximum m of the logits; p = exp(logit - m) stored in place with their sum s (one exp per
// logit); then the softmax p / s, its column sums (probs_sum) and, when grad_scale is given,
// g = (softmax - onehot) * grad_scale[row] in place with its column sums (grad_bias_sum). Returns the loss
// term log(s) - (logit[label] - m) = log-sum-exp - logit[label] of each row in loss_terms. Cloned per
// instruction set (SPIDR_CLONES) and chosen at run time.
SPIDR_CLONES void block_epilogue(float* __restrict logits, const float* __restrict bias, int64_t rows, int64_t K,
                                 const int64_t* __restrict labels,
                                 float* __restrict loss_terms, float* __restrict probs_sum,
                                 const float* __restrict grad_scale, float* __restrict grad_bias_sum) {
  const int64_t full = K / kLanes * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict row = logits + r * K;
    Vec lane_max = splat(-std::numeric_limits<float>::max());
    for (int64_t k = 0; k < full; k += kLanes) {
      const Vec x = load(row + k) + load(bias + k);
      store(row + k, x);
      lane_max = vmax(lane_max, x);
    }
    float m = -std::numeric_limits<float>::max();
    for (int64_t l = 0; l < kLanes; ++l) m = lane_max[l] > m ? lane_max[l] : m;
    for (int64_t k = full; k < K; ++k) {
      row[k] += bias[k];
      m = row[k] > m ? row[k] : m;
    }
    const int64_t label = labels[r];
    const float label_logit = row[label];
    const Vec mv = splat(m);
    Vec lane_sum = splat(0.0f);
    for (int64_t k = 0; k < full; k += kLanes) {
      const Vec e = exp_nonpositive(load(row + k) - mv);
      store(row + k, e);
      lane_sum += e;
    }
    float s = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) s += lane_sum[l];
    for (int64_t k = full; k < K; ++k) {
      row[k] = exp_nonpositive(row[k] - m);
      s += row[k];
    }
    // -log_softmax[label] = log(sum exp(logit - max)) - (logit[label] - max)
    loss_terms[r] = std::log(s) - (label_logit - m);
    const float inv = 1.0f / s;
    const Vec invv = splat(inv);
    if (grad_scale != nullptr) {
      const float g = grad_scale[r];
      const Vec gv = splat(g);
      for (int64_t k = 0; k < full; k += kLanes) {
        const Vec p = load(row + k) * invv;
        store(probs_sum + k, load(probs_sum + k) + p);
        const Vec q = p * gv;
        store(row + k, q);
        store(grad_bias_sum + k, load(grad_bias_sum + k) + q);
      }
      for (int64_t k = full; k < K; ++k) {
        const float p = row[k] * inv;
        probs_sum[k] += p;
        row[k] = p * g;
        grad_bias_sum[k] += row[k];
      }
      row[label] -= g;  // the one-hot term of the gradient
      grad_bias_sum[label] -= g;
    } else {
      for (int64_t k = 0; k < full; k += kLanes) {
        const Vec p = load(row + k) * invv;
        store(probs_sum + k, load(probs_sum + k) + p);
        store(row + k, p);
      }
      for (int64_t k = full; k < K; ++k) {
        row[k] *= inv;
        probs_sum[k] += row[k];
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
  // Rows per block: about a 4 MiB logits buffer (so each GEMM is large enough to run at the BLAS rate),
  // balanced so that the last block is not a small remainder.
  const int64_t target = std::clamp<int64_t>((int64_t{1} << 20) / a.K, 64, 16384);
  const int64_t num_blocks = (a.N + target - 1) / target;
  const int64_t block = (a.N + num_blocks - 1) / num_blocks;
  const int threads = max_threads();
  const float inv_heads = 1.0f / static_cast<float>(a.C);

  at::Tensor grad_h32, grad_w32, grad_b32;
  if (want_grads) {
    grad_h32 = empty_float_huge(h.sizes(), fopts);  // every element is written by its block's first head
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
  // Per-thread column sums of the softmax and of g, merged after each block (no atomics).
  auto partial = at::zeros({threads, 2, a.K}, fopts);
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
      at::mm_out(lg, hb, wi.t());  // the bias is added by the epilogue, in the same pass as the maximum
      const int64_t* lab = labels.data_ptr<int64_t>() + i * a.N + r0;
      const float* gs = want_grads ? scale.data_ptr<float>() + r0 : nullptr;
      float* lp = lg.data_ptr<float>();
      const float* bias_ptr = bf.data_ptr<float>() + i * a.K;
      float* tp = terms.data_ptr<float>();
      partial.zero_();
#pragma omp parallel num_threads(threads)
      {
        const int t = thread_id(), nt = team_size();
        const int64_t per = (rows + nt - 1) / nt, begin = std::min(rows, t * per), end = std::min(rows, begin + per);
        float* mine = partial_ptr + t * 2 * a.K;
        block_epilogue(lp + begin * a.K, bias_ptr, end - begin, a.K, lab + begin, tp + begin, mine,
                       gs == nullptr ? nullptr : gs + begin, mine + a.K);
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
