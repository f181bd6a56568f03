// FIG modified energy on CUDA (DESIGN.md, method 1), per row of logits f [B, C] with s = f / c:
//   E = sum_y s_y (1 - exp(s_y)),        dE/df_y = (1/c) (1 - (1 + s_y) exp(s_y)),
// computed as E = sum_y -s_y expm1(s_y) and dE/df_y = (1/c) (-expm1(s_y) - s_y exp(s_y)) as the reference does:
// 1 - exp(s) cancels for small |s| (relative error 1.4e-3 at s = 1e-5 in float), expm1 does not.
// One pass over each row. A row belongs to one warp when C <= kWarpRowMax (rows are short and many) and to a
// whole block otherwise; the threads of a row walk it in packs of 16 bytes (float4, 8 halves, 2 doubles) when
// C and the pointers allow it, else element by element. float16/bfloat16 are computed in float; float64 in
// double. NaN and +-inf propagate as in the reference (expm1f/expf, expm1/exp, no clamping).
#include <cstdint>

#include "cuda/device_math.cuh"
#include "cuda/modified_energy_kernel.h"

namespace fastood {
namespace cuda {
namespace {

constexpr int64_t kWarpRowMax = 1024;     // longest row handled by a single warp
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid-stride beyond this

template <typename T, int P>
struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

// Sum over the kThreadsPerRow threads of a row (a warp, or the whole block through `shared`); every thread
// of the row gets the total.
template <int kThreadsPerRow, typename A>
__device__ __forceinline__ A row_sum(A v, A* shared) {
  v = warp_sum(v);
  if constexpr (kThreadsPerRow > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = warp_sum(lane < kThreadsPerRow / 32 ? shared[lane] : A(0));
  }
  return v;
}

// kThreadsPerRow threads per row (32: rows of a block are independent warps; kThreads: one row per block),
// P values per load. kEnergy: energy[row]; kGrad: grad[row, :] = grad_scale[row] (or 1) / c * (...).
template <typename T, int P, int kThreadsPerRow, bool kEnergy, bool kGrad>
__global__ void __launch_bounds__(kThreads)
    modified_energy_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols, typename Acc<T>::type inv_c,
                           T* __restrict__ energy, T* __restrict__ grad,
                           const typename Acc<T>::type* __restrict__ grad_scale) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, P>;
  constexpr int kRowsPerBlock = kThreads / kThreadsPerRow;
  __shared__ A shared[kThreads / 32];
  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t packs = cols / P;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow; row < rows;
       row += row_stride) {
    const PackT* in = reinterpret_cast<const PackT*>(logits + row * cols);
    PackT* out = kGrad ? reinterpret_cast<PackT*>(grad + row * cols) : nullptr;
    const A g = (grad_scale != nullptr ? grad_scale[row] : A(1)) * inv_c;
    A sum = 0;
    for (int64_t i = lane; i < packs; i += kThreadsPerRow) {
      const PackT x = in[i];
      PackT y;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const A s = to_acc(x.v[j]) * inv_c;
        const A em1 = expm1_acc(s);
        if (kEnergy) sum -= s * em1;
        if (kGrad) y.v[j] = from_acc<T>(g * (-em1 - s * exp_acc(s)));
      }
      if (kGrad) out[i] = y;
    }
    if (kEnergy) {
      sum = row_sum<kThreadsPerRow>(sum, shared);
      if (lane == 0) energy[row] = from_acc<T>(sum);
    }
  }
}

template <typename T, int P, int kThreadsPerRow>
void launch_rows(const T* logits, int64_t rows, int64_t cols, double c, T* energy, T* grad, const void* grad_scale,
                 cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr int64_t kRowsPerBlock = kThreads / kThreadsPerRow;
  const int64_t needed = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
  const A inv_c = A(1) / static_cast<A>(c);
  const A* scale = static_cast<const A*>(grad_scale);
  if (energy != nullptr && grad != nullptr) {
    auto kernel = &modified_energy_kernel<T, P, kThreadsPerRow, true, true>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, inv_c, energy, grad, scale);
  } else if (energy != nullptr) {
    auto kernel = &modified_energy_kernel<T, P, kThreadsPerRow, true, false>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, inv_c, energy, nullptr, scale);
  } else {
    auto kernel = &modified_energy_kernel<T, P, kThreadsPerRow, false, true>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, inv_c, nullptr, grad, scale);
  }
}

template <typename T, int P>
void launch_packed(const T* logits, int64_t rows, int64_t cols, double c, T* energy, T* grad,
                   const void* grad_scale, cudaStream_t stream) {
  if (cols <= kWarpRowMax) {
    launch_rows<T, P, 32>(logits, rows, cols, c, energy, grad, grad_scale, stream);
  } else {
    launch_rows<T, P, kThreads>(logits, rows, cols, c, energy, grad, grad_scale, stream);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void launch_modified_energy_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols, double c,
                                   void* energy, void* grad, const void* grad_scale, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = 16 / sizeof(T);
    const T* in = static_cast<const T*>(logits);
    T* e = static_cast<T*>(energy);
    T* g = static_cast<T*>(grad);
    if (cols % P == 0 && aligned16(logits) && aligned16(grad)) {
      launch_packed<T, P>(in, rows, cols, c, e, g, grad_scale, stream);
    } else {
      launch_packed<T, 1>(in, rows, cols, c, e, g, grad_scale, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastood
