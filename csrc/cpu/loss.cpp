// CPU masked-prediction loss: fused linear + cross-entropy by row blocks, forward and gradients in one pass.
//
// Each OpenMP thread owns whole row blocks. For a block and a head it computes the block's logits
// (one BLAS call per K tile into a thread-local buffer), their log-sum-exp (online across K tiles
// when K is larger than one tile), the loss terms and the softmax; with gradients wanted, the
// buffer becomes g = (softmax - onehot) * scale in place and is reduced at once into grad_h
// (rows owned by the thread) and per-thread partials of grad_weight and grad_bias, merged at the
// end. Only one (block, K) buffer per thread is ever alive: the (N, K) logits never exist.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "parallel.h"

namespace spidr::cpu {
namespace {

constexpr int64_t kTileK = 512;

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

// One fused pass. row_scale (N,) float32, when defined, multiplies each row's gradient (the upstream
// gradient); otherwise it is 1. Gradients are of sum(loss), i.e. the per-head terms divided by C.
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
  // Kernels compute values only: detached inputs keep the ATen calls below out of autograd in every thread.
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
  const int64_t block = std::clamp<int64_t>(65536 / a.K, 16, 512);
  const int64_t blocks = (a.N + block - 1) / block;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads(), blocks)));
  const float inv_heads = 1.0f / static_cast<float>(a.C);

  auto probs_partial = at::zeros({threads, a.C, a.K}, fopts);
  at::Tensor grad_h32, gw_partial, gb_partial;
  if (want_grads) {
    grad_h32 = at::zeros(h.sizes(), fopts);
    gw_partial = at::zeros({threads, a.C, a.K, a.D}, fopts);
    gb_partial = at::zeros({threads, a.C, a.K}, fopts);
  }
  const auto scale = row_scale.defined() ? row_scale.detach().to(at::kFloat).contiguous() : at::Tensor();
  float* loss_ptr = out.loss.data_ptr<float>();
  const int64_t* label_ptr = labels.data_ptr<int64_t>();

  ExceptionCatcher catcher;
#pragma omp parallel num_threads(threads)
  {
    catcher.run([&] {
      const int t = thread_id();
      auto logits = at::empty({block, a.K}, fopts);
      auto staged = convert ? at::empty({block, a.D}, fopts) : at::Tensor();
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < blocks; ++b) {
        catcher.run([&] {
          const int64_t r0 = b * block, rows = std::min(block, a.N - r0);
          auto lg = logits.narrow(0, 0, rows);
          for (int64_t i = 0; i < a.C; ++i) {
            auto hb = (a.shared ? h : h.select(0, i)).narrow(0, r0, rows);
            if (convert) hb = staged.narrow(0, 0, rows).copy_(hb);
            const auto wi = wf.select(0, i), bi = bf.select(0, i);
            at::Tensor shifted_label;  // logits[label] - lse, per row
            auto lab = labels.select(0, i).narrow(0, r0, rows).unsqueeze(1);
            if (a.K <= kTileK) {
              at::addmm_out(lg, bi, hb, wi.t());
              auto m = std::get<0>(lg.max(1, /*keepdim=*/true));
              lg.sub_(m);
              auto at_label = lg.gather(1, lab);  // logit[label] - max
              lg.exp_();
              auto s = lg.sum(1, /*keepdim=*/true);
              lg.div_(s);  // softmax
              // log_softmax[label] = (logit[label] - max) - log(sum exp(logit - max))
              shifted_label = (at_label - s.log()).squeeze(1);
            } else {
              // Online log-sum-exp across K tiles: running max m and rescaled running sum s.
              auto m = at::full({rows, 1}, -std::numeric_limits<float>::infinity(), fopts);
              auto s = at::zeros({rows, 1}, fopts);
              for (int64_t k0 = 0; k0 < a.K; k0 += kTileK) {
                const int64_t kw = std::min(kTileK, a.K - k0);
                auto tile = lg.narrow(1, k0, kw);
                at::addmm_out(tile, bi.narrow(0, k0, kw), hb, wi.narrow(0, k0, kw).t());
                auto m_new = at::maximum(m, std::get<0>(tile.max(1, true)));
                s = s * (m - m_new).exp() + (tile - m_new).exp().sum(1, true);
                m = m_new;
              }
              auto lse = m + s.log();
              shifted_label = (lg.gather(1, lab) - lse).squeeze(1);
              lg.sub_(lse).exp_();  // softmax
            }
            probs_partial.select(0, t).select(0, i).add_(lg.sum(0));
            if (want_loss) {
              const float* sl = shifted_label.data_ptr<float>();
              for (int64_t r = 0; r < rows; ++r) loss_ptr[r0 + r] -= sl[r];
            }
            if (want_grads) {
              const int64_t* lab = label_ptr + i * a.N + r0;
              float* g = lg.data_ptr<float>();
              for (int64_t r = 0; r < rows; ++r) g[r * a.K + lab[r]] -= 1.0f;
              if (scale.defined()) {
                lg.mul_(scale.narrow(0, r0, rows).unsqueeze(1) * inv_heads);
              } else {
                lg.mul_(inv_heads);
              }
              auto gh = (a.shared ? grad_h32 : grad_h32.select(0, i)).narrow(0, r0, rows);
              at::addmm_out(gh, gh, lg, wi);
              auto gw = gw_partial.select(0, t).select(0, i);
              at::addmm_out(gw, gw, lg.t(), hb);
              gb_partial.select(0, t).select(0, i).add_(lg.sum(0));
            }
          }
        });
      }
    });
  }
  catcher.rethrow();
  if (want_loss) out.loss.mul_(inv_heads);
  out.mean_probs = probs_partial.sum(0).div_(static_cast<float>(a.N));
  if (want_grads) {
    out.grad_h = grad_h32.to(h_in.scalar_type());
    out.grad_weight = gw_partial.sum(0).to(weight.scalar_type());
    out.grad_bias = gb_partial.sum(0).to(bias.scalar_type());
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
  check_cpu(grad_loss, "grad_loss");
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == h.size(-2), "grad_loss must be (N=", h.size(-2),
              ",), got ", grad_loss.sizes());
  const bool saved = grad_h.numel() > 0 || grad_weight.numel() > 0;
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
