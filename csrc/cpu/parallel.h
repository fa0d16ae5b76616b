// Shared helpers of the CPU kernels: OpenMP thread queries, argument checks, per-ISA function clones
// and large buffers backed by transparent huge pages.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

// Functions marked SPIDR_CLONES are compiled once per instruction set (AVX-512, AVX2, baseline) and the
// best one for the running CPU is chosen when the library loads (GCC/Clang ifunc), so their loops are
// vectorised for the machine whatever the build flags. Elsewhere (not x86-64) it is a plain function.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SPIDR_NO_CLONES)
#define SPIDR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPIDR_CLONES
#endif

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

// An uninitialised float32 CPU tensor for large outputs (a gradient of hundreds of MB): on Linux it is
// mapped with MADV_HUGEPAGE, so the first write faults once per 2 MiB page instead of once per 4 KiB
// (about 0.15 ms per MB otherwise, on the development VM). The kernel may ignore the advice (THP set to
// "never"); small tensors, and any failure to map, take at::empty.
inline at::Tensor empty_float_huge(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const auto opts = options.dtype(at::kFloat);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  if (opts.device().is_cpu() && bytes >= 4 * kHuge) {
    const size_t length = bytes + kHuge;  // room to align the start to a huge page
    void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base != MAP_FAILED) {
      const auto start = (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
      void* data = reinterpret_cast<void*>(start);
      madvise(data, bytes, MADV_HUGEPAGE);  // advice only: an error leaves ordinary pages
      return at::from_blob(
          data, sizes, [base, length](void*) { munmap(base, length); }, opts);
    }
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace spidr::cpu
