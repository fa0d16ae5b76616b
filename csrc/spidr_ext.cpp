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

// Operator schemas of the compiled backends are defined here as the kernels land.
TORCH_LIBRARY(spidr, m) {}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "spidr compiled kernels";
  module.def("build_info", &build_info, "How this extension was built: compiler, OpenMP, CUDA, torch version.");
}
