// Shared helpers of the CPU kernels: OpenMP thread queries and argument checks.
#pragma once

#include <ATen/ATen.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spidr::cpu {

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kDouble,
              name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the cpp backend, got ", t.device());
}

}  // namespace spidr::cpu
