// CUDA kernels of the codebook ops: nearest-codeword assignment and per-codeword segment sums.
//
// Shapes: C codebooks, N rows, D features, K codewords. Both ops match spidr.ops.reference.
//
// assign_codes: the codewords c = codebooks / counts and their squared norms are formed with ATen
// (float32, (C, K, D) and (C, K): small). The kernel is a tiled float32 GEMM x @ c^T whose epilogue
// keeps a running (best distance, best index) per row, so the (N, K) distances never exist in
// memory. One block owns AC_BM rows of one codebook (grid: row tiles x C) and walks all K codewords
// tile by tile, each tile a loop over D in AC_BK-wide slices staged in shared memory (the next
// slice is prefetched into registers while the current one is multiplied). Each thread accumulates
// an 8 x 4 register tile with FMAs in a fixed order over D, so identical codewords give bitwise
// identical distances, and ties go to the lowest index.
//
// segment_sums: each codebook's labels are sorted with a stable sort (ATen), so each codeword's rows
// form a contiguous segment in their original order. One block per (codeword, codebook, D slice)
// finds its segment by binary search and sums the rows in a fixed order (8 warps take every 8th
// row, then a fixed-order reduction across warps): deterministic, no atomics. Labels outside
// [0, K) are never counted and never dereferenced.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

namespace spidr_cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Calls f(scalar_t{}) for the element types the kernels read: float32, float16, bfloat16.
template <typename F>
void dispatch_input_type(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kHalf:
      f(at::Half{});
      break;
    case at::kBFloat16:
      f(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

// float64 input is read as float32, as the reference does (x.float()).
at::Tensor readable(const at::Tensor& t) {
  return (t.scalar_type() == at::kDouble ? t.to(at::kFloat) : t).contiguous();
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// ---------------------------------------------------------------------------------------------
// assign_codes
// ---------------------------------------------------------------------------------------------

constexpr int AC_BM = 128;  // rows per block
constexpr int AC_BN = 64;   // codewords per tile
constexpr int AC_BK = 32;   // features per shared-memory slice
constexpr int AC_TM = 8;    // rows per thread
constexpr int AC_TN = 4;    // codewords per thread
constexpr int AC_THREADS = (AC_BM / AC_TM) * (AC_BN / AC_TN);  // 256
constexpr int AC_X_PER_THREAD = AC_BM * AC_BK / AC_THREADS;     // 16
constexpr int AC_C_PER_THREAD = AC_BN * AC_BK / AC_THREADS;     // 8
constexpr int AC_ROW_STEP = AC_THREADS / AC_BK;                 // 8 rows apart between a thread's loads
constexpr int AC_PAD = 4;  // keeps 16-byte alignment of shared rows for float4 reads

static_assert(AC_THREADS == 256, "the thread layout below assumes 256 threads");
static_assert(AC_BN / AC_TN == 16, "the argmin shuffle reduction spans 16 lanes");
static_assert(AC_BK == 32, "one warp loads one AC_BK-wide row slice");

// Is (d, i) a better candidate than (bd, bi)? torch.argmin semantics: NaN is the minimum, ties go to
// the lowest index, and an index < 0 means "no candidate yet".
__device__ __forceinline__ bool better(float d, int i, float bd, int bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  const bool dn = isnan(d);
  const bool bn = isnan(bd);
  if (dn || bn) return dn && bn ? i < bi : dn;
  return d < bd || (d == bd && i < bi);
}

template <typename scalar_t>
__global__ void __launch_bounds__(AC_THREADS)
    assign_codes_kernel(const scalar_t* __restrict__ x,          // (C, N, D)
                        const float* __restrict__ codewords,     // (C, K, D)
                        const float* __restrict__ norms,         // (C, K)
                        int64_t* __restrict__ labels,            // (C, N)
                        int64_t n_rows, int n_codewords, int dim) {
  __shared__ __align__(16) float xs[AC_BK][AC_BM + AC_PAD];
  __shared__ __align__(16) float cs[AC_BK][AC_BN + AC_PAD];

  const int tid = threadIdx.x;
  const int tx = tid % (AC_BN / AC_TN);  // codeword group: codewords tx*4 .. tx*4+3 of a tile
  const int ty = tid / (AC_BN / AC_TN);  // row group: rows ty*8 .. ty*8+7 of the block
  const int load_col = tid % AC_BK;      // feature this thread loads within a slice
  const int load_row = tid / AC_BK;      // first row / codeword this thread loads

  const int64_t c = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * AC_BM;
  const scalar_t* xc = x + c * n_rows * dim;
  const float* cwc = codewords + c * static_cast<int64_t>(n_codewords) * dim;
  const float* nc = norms + c * n_codewords;

  const int d_tiles = dim > 0 ? (dim + AC_BK - 1) / AC_BK : 1;
  const int k_tiles = (n_codewords + AC_BN - 1) / AC_BN;
  const int tiles = d_tiles * k_tiles;

  float xr[AC_X_PER_THREAD];
  float cr[AC_C_PER_THREAD];

  // Global -> registers for tile t (k tile t / d_tiles, d slice t % d_tiles); zeros out of bounds.
  auto load_tile = [&](int t) {
    const int k0 = (t / d_tiles) * AC_BN;
    const int d = (t % d_tiles) * AC_BK + load_col;
    const bool d_ok = d < dim;
#pragma unroll
    for (int i = 0; i < AC_X_PER_THREAD; ++i) {
      const int64_t row = row0 + load_row + i * AC_ROW_STEP;
      xr[i] = (d_ok && row < n_rows) ? to_float(xc[row * dim + d]) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < AC_C_PER_THREAD; ++i) {
      const int k = k0 + load_row + i * AC_ROW_STEP;
      cr[i] = (d_ok && k < n_codewords) ? cwc[static_cast<int64_t>(k) * dim + d] : 0.0f;
    }
  };

  float best[AC_TM];
  int best_idx[AC_TM];
#pragma unroll
  for (int i = 0; i < AC_TM; ++i) {
    best[i] = INFINITY;
    best_idx[i] = -1;
  }

  float acc[AC_TM][AC_TN];
#pragma unroll
  for (int i = 0; i < AC_TM; ++i) {
#pragma unroll
    for (int j = 0; j < AC_TN; ++j) acc[i][j] = 0.0f;
  }

  load_tile(0);
  for (int t = 0; t < tiles; ++t) {
    // Registers -> shared memory, transposed so that a thread's rows / codewords are contiguous.
#pragma unroll
    for (int i = 0; i < AC_X_PER_THREAD; ++i) xs[load_col][load_row + i * AC_ROW_STEP] = xr[i];
#pragma unroll
    for (int i = 0; i < AC_C_PER_THREAD; ++i) cs[load_col][load_row + i * AC_ROW_STEP] = cr[i];
    __syncthreads();

    if (t + 1 < tiles) load_tile(t + 1);  // in flight while this slice is multiplied

#pragma unroll
    for (int kk = 0; kk < AC_BK; ++kk) {
      const float4 a_lo = *reinterpret_cast<const float4*>(&xs[kk][ty * AC_TM]);
      const float4 a_hi = *reinterpret_cast<const float4*>(&xs[kk][ty * AC_TM + 4]);
      const float4 b = *reinterpret_cast<const float4*>(&cs[kk][tx * AC_TN]);
      const float a[AC_TM] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
      const float bv[AC_TN] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < AC_TM; ++i) {
#pragma unroll
        for (int j = 0; j < AC_TN; ++j) acc[i][j] = fmaf(a[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();

    if (t % d_tiles == d_tiles - 1) {
      // Epilogue of a codeword tile: distances ||c||^2 - 2 x.c, running argmin in increasing k.
      const int k0 = (t / d_tiles) * AC_BN;
#pragma unroll
      for (int j = 0; j < AC_TN; ++j) {
        const int k = k0 + tx * AC_TN + j;
        if (k < n_codewords) {
          const float norm = nc[k];
#pragma unroll
          for (int i = 0; i < AC_TM; ++i) {
            const float dist = norm - 2.0f * acc[i][j];
            if (better(dist, k, best[i], best_idx[i])) {
              best[i] = dist;
              best_idx[i] = k;
            }
          }
        }
      }
#pragma unroll
      for (int i = 0; i < AC_TM; ++i) {
#pragma unroll
        for (int j = 0; j < AC_TN; ++j) acc[i][j] = 0.0f;
      }
    }
  }

  // The 16 threads of a row group are 16 consecutive lanes of one warp: butterfly reduction.
#pragma unroll
  for (int i = 0; i < AC_TM; ++i) {
    float bd = best[i];
    int bi = best_idx[i];
#pragma unroll
    for (int offset = (AC_BN / AC_TN) / 2; offset > 0; offset /= 2) {
      const float od = __shfl_xor_sync(0xffffffffu, bd, offset);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, offset);
      if (better(od, oi, bd, bi)) {
        bd = od;
        bi = oi;
      }
    }
    const int64_t row = row0 + ty * AC_TM + i;
    if (tx == 0 && row < n_rows) labels[c * n_rows + row] = bi;
  }
}

at::Tensor assign_codes_cuda(const at::Tensor& x_in, const at::Tensor& codebooks_in, const at::Tensor& counts_in) {
  constexpr const char* op = "spidr::assign_codes";
  TORCH_CHECK(x_in.defined() && codebooks_in.defined() && counts_in.defined(), op, ": undefined tensor argument");
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  TORCH_CHECK(codebooks_in.device() == x_in.device() && counts_in.device() == x_in.device(), op,
              ": all tensors must be on the same device: x on ", x_in.device(), ", codebooks on ",
              codebooks_in.device(), ", counts on ", counts_in.device());
  TORCH_CHECK(x_in.dim() == 3, op, ": x must be (C, N, D), got shape ", x_in.sizes());
  TORCH_CHECK(codebooks_in.dim() == 3, op, ": codebooks must be (C, K, D), got shape ", codebooks_in.sizes());
  TORCH_CHECK(counts_in.dim() == 2, op, ": counts must be (C, K), got shape ", counts_in.sizes());
  TORCH_CHECK(is_float_type(x_in.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ",
              x_in.scalar_type());
  TORCH_CHECK(is_float_type(codebooks_in.scalar_type()) && is_float_type(counts_in.scalar_type()), op,
              ": codebooks and counts must be floating point, got ", codebooks_in.scalar_type(), " and ",
              counts_in.scalar_type());
  const int64_t C = x_in.size(0);
  const int64_t N = x_in.size(1);
  const int64_t D = x_in.size(2);
  const int64_t K = codebooks_in.size(1);
  TORCH_CHECK(codebooks_in.size(0) == C && codebooks_in.size(2) == D, op, ": codebooks must have shape (C=", C,
              ", K, D=", D, ") to match x, got ", codebooks_in.sizes());
  TORCH_CHECK(K > 0, op, ": codebooks must hold at least one codeword (K > 0)");
  TORCH_CHECK(counts_in.size(0) == C && counts_in.size(1) == K, op, ": counts must have shape (C=", C, ", K=", K,
              "), got ", counts_in.sizes());
  TORCH_CHECK(C <= 65535, op, ": at most 65535 codebooks, got ", C);
  TORCH_CHECK(K <= std::numeric_limits<int>::max() && D <= std::numeric_limits<int>::max(), op,
              ": K and D must fit in int32");

  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor labels = at::empty({C, N}, x_in.options().dtype(at::kLong));
  if (N == 0 || C == 0) return labels;

  // Codewords and their squared norms in float32, exactly as the reference forms them.
  const at::Tensor codewords = (codebooks_in.to(at::kFloat) / counts_in.to(at::kFloat).unsqueeze(-1)).contiguous();
  const at::Tensor norms = codewords.square().sum(-1).contiguous();
  const at::Tensor x = readable(x_in);

  const int64_t row_tiles = (N + AC_BM - 1) / AC_BM;
  TORCH_CHECK(row_tiles <= std::numeric_limits<int>::max(), op, ": too many rows (N=", N, ")");
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(C));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_input_type(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    assign_codes_kernel<scalar_t><<<grid, AC_THREADS, 0, stream>>>(
        x.data_ptr<scalar_t>(), codewords.data_ptr<float>(), norms.data_ptr<float>(), labels.data_ptr<int64_t>(), N,
        static_cast<int>(K), static_cast<int>(D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return labels;
}

// ---------------------------------------------------------------------------------------------
// segment_sums
// ---------------------------------------------------------------------------------------------

constexpr int SS_WARPS = 8;                    // warps per block, each summing every 8th row
constexpr int SS_COLS_PER_LANE = 4;            // features per lane
constexpr int SS_DCHUNK = 32 * SS_COLS_PER_LANE;  // features per block (D slice)

// First position in sorted[0, n) whose value is >= key.
__device__ __forceinline__ int64_t lower_bound(const int64_t* __restrict__ sorted, int64_t n, int64_t key) {
  int64_t lo = 0;
  int64_t hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename scalar_t>
__global__ void __launch_bounds__(32 * SS_WARPS)
    segment_sums_kernel(const scalar_t* __restrict__ x,              // (C, N, D)
                        const int64_t* __restrict__ sorted_labels,   // (C, N), each row sorted
                        const int64_t* __restrict__ order,           // (C, N): original row of each sorted entry
                        float* __restrict__ count,                   // (C, K)
                        float* __restrict__ memory,                  // (C, K, D)
                        int64_t n_rows, int n_codewords, int dim) {
  __shared__ float partial[SS_WARPS][SS_DCHUNK];
  __shared__ int64_t bounds[2];

  const int k = blockIdx.x;
  const int64_t c = blockIdx.y;
  const int lane = threadIdx.x;
  const int warp = threadIdx.y;
  const int64_t* sl = sorted_labels + c * n_rows;

  if (lane == 0 && warp < 2) bounds[warp] = lower_bound(sl, n_rows, static_cast<int64_t>(k) + warp);
  __syncthreads();
  const int64_t start = bounds[0];
  const int64_t end = bounds[1];
  if (blockIdx.z == 0 && lane == 0 && warp == 0) count[c * n_codewords + k] = static_cast<float>(end - start);

  const int d0 = blockIdx.z * SS_DCHUNK + lane;
  float acc[SS_COLS_PER_LANE];
#pragma unroll
  for (int q = 0; q < SS_COLS_PER_LANE; ++q) acc[q] = 0.0f;

  const int64_t* oc = order + c * n_rows;
  const scalar_t* xc = x + c * n_rows * dim;
#pragma unroll 4
  for (int64_t j = start + warp; j < end; j += SS_WARPS) {
    const scalar_t* xrow = xc + oc[j] * dim;
#pragma unroll
    for (int q = 0; q < SS_COLS_PER_LANE; ++q) {
      const int d = d0 + 32 * q;
      if (d < dim) acc[q] += to_float(xrow[d]);
    }
  }
#pragma unroll
  for (int q = 0; q < SS_COLS_PER_LANE; ++q) partial[warp][lane + 32 * q] = acc[q];
  __syncthreads();

  if (warp == 0) {
    float* out = memory + (c * n_codewords + k) * static_cast<int64_t>(dim);
#pragma unroll
    for (int q = 0; q < SS_COLS_PER_LANE; ++q) {
      const int d = d0 + 32 * q;
      if (d < dim) {
        float s = partial[0][lane + 32 * q];
#pragma unroll
        for (int w = 1; w < SS_WARPS; ++w) s += partial[w][lane + 32 * q];
        out[d] = s;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> segment_sums_cuda(const at::Tensor& x_in, const at::Tensor& labels_in,
                                                     int64_t num_codewords) {
  constexpr const char* op = "spidr::segment_sums";
  TORCH_CHECK(x_in.defined() && labels_in.defined(), op, ": undefined tensor argument");
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got device ", x_in.device());
  TORCH_CHECK(labels_in.device() == x_in.device(), op, ": all tensors must be on the same device: x on ",
              x_in.device(), ", labels on ", labels_in.device());
  TORCH_CHECK(x_in.dim() == 3, op, ": x must be (C, N, D), got shape ", x_in.sizes());
  TORCH_CHECK(labels_in.dim() == 2, op, ": labels must be (C, N), got shape ", labels_in.sizes());
  TORCH_CHECK(is_float_type(x_in.scalar_type()), op, ": x must be floating point, got ", x_in.scalar_type());
  TORCH_CHECK(labels_in.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels_in.scalar_type());
  const int64_t C = x_in.size(0);
  const int64_t N = x_in.size(1);
  const int64_t D = x_in.size(2);
  TORCH_CHECK(labels_in.size(0) == C && labels_in.size(1) == N, op, ": labels must have shape (C=", C, ", N=", N,
              ") to match x, got ", labels_in.sizes());
  TORCH_CHECK(num_codewords > 0, op, ": num_codewords must be positive, got ", num_codewords);
  TORCH_CHECK(num_codewords <= std::numeric_limits<int>::max() && D <= std::numeric_limits<int>::max(), op,
              ": num_codewords and D must fit in int32");
  TORCH_CHECK(C <= 65535, op, ": at most 65535 codebooks, got ", C);
  const int64_t K = num_codewords;

  c10::cuda::CUDAGuard guard(x_in.device());
  const auto fopts = x_in.options().dtype(at::kFloat);
  at::Tensor count = at::zeros({C, K}, fopts);
  at::Tensor memory = at::zeros({C, K, D}, fopts);
  if (N == 0 || C == 0) return std::make_tuple(count, memory);

  const at::Tensor x = readable(x_in);
  const at::Tensor labels = labels_in.contiguous();
  // Stable: equal labels keep their original order, so every segment is summed in row order.
  const auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const at::Tensor sorted_labels = std::get<0>(sorted).contiguous();
  const at::Tensor order = std::get<1>(sorted).contiguous();

  const int64_t d_chunks = D > 0 ? (D + SS_DCHUNK - 1) / SS_DCHUNK : 1;
  TORCH_CHECK(d_chunks <= 65535, op, ": D too large (", D, ")");
  const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(C), static_cast<unsigned>(d_chunks));
  const dim3 block(32, SS_WARPS);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_input_type(x.scalar_type(), op, [&](auto tag) {
    using scalar_t = decltype(tag);
    segment_sums_kernel<scalar_t><<<grid, block, 0, stream>>>(
        x.data_ptr<scalar_t>(), sorted_labels.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
        count.data_ptr<float>(), memory.data_ptr<float>(), N, static_cast<int>(K), static_cast<int>(D));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return std::make_tuple(count, memory);
}

}  // namespace
}  // namespace spidr_cuda

TORCH_LIBRARY_IMPL(spidr, CUDA, m) {
  m.impl("assign_codes", &spidr_cuda::assign_codes_cuda);
  m.impl("segment_sums", &spidr_cuda::segment_sums_cuda);
}
