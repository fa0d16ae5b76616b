// spidr._C: the compiled half of spidr.ops.
//
// One translation unit holds the operator schemas (TORCH_LIBRARY) and the pybind11 module. Kernel
// implementations live in cpu/ and cuda/ and register themselves with TORCH_LIBRARY_IMPL.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>

namespace {

std::string compiler_name() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "gcc " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
  info["compiler"] = compiler_name();
#ifdef _OPENMP
  info["openmp"] = true;
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
#endif
#ifdef SPIDR_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

// Operator schemas of the compiled backends (C codebooks or heads, N rows, D features, K codewords).
// Implementations: cpu/ (dispatch key CPU) and cuda/ (CUDA). Python adds fake kernels and autograd
// (spidr/ops/compiled.py). Every implementation validates its arguments with TORCH_CHECK.
TORCH_LIBRARY(spidr, m) {
  // labels (C, N) int64: argmin_k ||c_k||^2 - 2 x.c_k with c = codebooks / counts[..., None], in float32,
  // ties to the lowest index. x (C, N, D) float32/bfloat16/float16; codebooks (C, K, D) and counts (C, K) float32.
  m.def("assign_codes(Tensor x, Tensor codebooks, Tensor counts) -> Tensor");
  // (count (C, K) float32, memory (C, K, D) float32): rows labelled k per codebook, and their sum.
  m.def("segment_sums(Tensor x, Tensor labels, int num_codewords) -> (Tensor, Tensor)");
  // In place: x = gelu(layer_norm(x)) over the last dimension (a multiple of 16; exact erf GELU), with
  // optional affine weight and bias (D,). x contiguous float32. CPU only: the conv extractor's and the
  // positional convs' normalisation when extracting features.
  // Returns nothing (the result is x): an op whose output aliases an input cannot be functionalised, so
  // torch.compile could not trace it.
  m.def("layer_norm_gelu_(Tensor(a!) x, Tensor? weight, Tensor? bias, float eps) -> ()");
  // (batch, frames_out, out) = gelu(norm(conv1d(x, kernel 3, stride 2) + conv_bias)) on channels-last x
  // (batch, frames_in, in) float32, the even rows' taps by Winograd's F(3, 2) (7/9 of the multiply-adds).
  // taps (5, in, out): W1, W0, (W0 + W2) / 2, (W0 - W2) / 2 and W2, with W_j = conv_weight[:, :, j].T.
  // norm: LayerNorm over the channels (optional affine weight and bias (out,)) when normalize, else none.
  // in and out multiples of 16. CPU only: the conv extractor when extracting features.
  m.def(
      "conv_k3s2_gelu(Tensor x, Tensor taps, Tensor? conv_bias, bool normalize, Tensor? weight, Tensor? bias,"
      " float eps) -> Tensor");
  // Masked-prediction loss. h (N, D) shared by all heads or (C, N, D); weight (C, K, D); bias (C, K);
  // labels (C, N). Returns (loss (N,) float32, mean_probs (C, K) float32, grad_h, grad_weight, grad_bias):
  // with compute_grads, the gradients of sum(loss) (upstream gradient of ones) in the dtypes of h,
  // weight and bias, computed in the same pass as the loss; without, three empty tensors.
  m.def(
      "mpl_forward(Tensor h, Tensor weight, Tensor bias, Tensor labels, bool compute_grads)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients for the upstream gradient grad_loss (N,): the saved ones scaled when grad_loss is uniform,
  // else recomputed exactly from h, weight, bias and labels.
  m.def(
      "mpl_backward(Tensor grad_loss, Tensor h, Tensor weight, Tensor bias, Tensor labels, Tensor grad_h,"
      " Tensor grad_weight, Tensor grad_bias) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "spidr compiled kernels";
  module.def("build_info", &build_info, "How this extension was built: compiler, OpenMP, CUDA, torch version.");
}
