// Entropy of softmax on CUDA, per row of logits f [B, C]. With m = max_k f_k, z_k = f_k - m, e_k = exp(z_k),
// S = sum_k e_k and T = sum_k e_k z_k (stable for |f| up to 1e4 and beyond: z <= 0 and S >= 1):
//   H = log S - T / S,        dH/df_j = -(e_j / S) (z_j - T / S)  (= -p_j (log p_j + H)).
// A row belongs to one warp when C <= kWarpRowMax and to a whole block otherwise. Each thread keeps its first
// kCache packs of the row (16-byte loads: float4, 8 halves, 2 doubles, when C and the pointers allow it) in
// registers, so rows up to kWarpRowMax floats are read from memory once for the max, the sums and the
// gradient; longer rows re-read the rest. float16/bfloat16 are computed in float; float64 in double. NaN:
// the max lets NaN win, so a row holding a NaN (or +inf, inf - inf) gives NaN, as the reference does; a -inf
// gives 0 * -inf = NaN, again as the reference's p log p does.
#include <cstdint>

#include "cuda/device_math.cuh"
#include "cuda/softmax_entropy_kernel.h"

namespace fastood {
namespace cuda {
namespace {

constexpr int64_t kWarpRowMax = 1024;     // longest row handled by a single warp
constexpr int kCache = 8;                 // packs per thread kept in registers
constexpr int64_t kMaxBlocks = 65535 * 8;  // grid-stride beyond this

template <typename T, int P>
struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

__device__ __forceinline__ float neg_inf(float) { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ double neg_inf(double) { return -__longlong_as_double(0x7ff0000000000000LL); }

// Sum / max over the kThreadsPerRow threads of a row (a warp, or the whole block through `shared`); every
// thread of the row gets the result.
template <int kThreadsPerRow, bool kMax, typename A>
__device__ __forceinline__ A row_reduce(A v, A* shared) {
  v = kMax ? warp_max(v) : warp_sum(v);
  if constexpr (kThreadsPerRow > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    __syncthreads();  // `shared` may still be read by the previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    constexpr int kWarps = kThreadsPerRow / 32;
    v = lane < kWarps ? shared[lane] : (kMax ? neg_inf(A(0)) : A(0));
    v = kMax ? warp_max(v) : warp_sum(v);
  }
  return v;
}

// kThreadsPerRow threads per row (32: rows of a block are independent warps; kThreads: one row per block),
// P values per load. Forward: entropy[row]. kBackward: grad[row, :] = grad_entropy[row] dH/df.
template <typename T, int P, int kThreadsPerRow, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    softmax_entropy_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols, T* __restrict__ entropy,
                           T* __restrict__ grad, const typename Acc<T>::type* __restrict__ grad_entropy) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, P>;
  constexpr int kRowsPerBlock = kThreads / kThreadsPerRow;
  __shared__ A shared[kThreads / 32];
  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t packs = cols / P;
  const int64_t rest = lane + static_cast<int64_t>(kCache) * kThreadsPerRow;  // first pack not in registers
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow; row < rows;
       row += row_stride) {
    const PackT* in = reinterpret_cast<const PackT*>(logits + row * cols);

    PackT cache[kCache];
    A m = neg_inf(A(0));
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int64_t i = lane + static_cast<int64_t>(c) * kThreadsPerRow;
      if (i < packs) {
        cache[c] = in[i];
#pragma unroll
        for (int j = 0; j < P; ++j) m = nan_max(m, to_acc(cache[c].v[j]));
      }
    }
    for (int64_t i = rest; i < packs; i += kThreadsPerRow) {
      const PackT x = in[i];
#pragma unroll
      for (int j = 0; j < P; ++j) m = nan_max(m, to_acc(x.v[j]));
    }
    m = row_reduce<kThreadsPerRow, true>(m, shared);

    A sum = 0, weighted = 0;
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      if (lane + static_cast<int64_t>(c) * kThreadsPerRow < packs) {
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const A z = to_acc(cache[c].v[j]) - m;
          const A e = exp_acc(z);
          sum += e;
          weighted += e * z;
        }
      }
    }
    for (int64_t i = rest; i < packs; i += kThreadsPerRow) {
      const PackT x = in[i];
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const A z = to_acc(x.v[j]) - m;
        const A e = exp_acc(z);
        sum += e;
        weighted += e * z;
      }
    }
    sum = row_reduce<kThreadsPerRow, false>(sum, shared);
    weighted = row_reduce<kThreadsPerRow, false>(weighted, shared);

    if (!kBackward) {
      if (lane == 0) entropy[row] = from_acc<T>(log_acc(sum) - weighted / sum);
      continue;
    }
    // dH/df_k = (g / S) e_k (T / S - z_k), e_k recomputed (cheaper than keeping it).
    const A mean_z = weighted / sum;
    const A scale = grad_entropy[row] / sum;
    PackT* out = reinterpret_cast<PackT*>(grad + row * cols);
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int64_t i = lane + static_cast<int64_t>(c) * kThreadsPerRow;
      if (i < packs) {
        PackT y;
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const A z = to_acc(cache[c].v[j]) - m;
          y.v[j] = from_acc<T>(scale * exp_acc(z) * (mean_z - z));
        }
        out[i] = y;
      }
    }
    for (int64_t i = rest; i < packs; i += kThreadsPerRow) {
      const PackT x = in[i];
      PackT y;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const A z = to_acc(x.v[j]) - m;
        y.v[j] = from_acc<T>(scale * exp_acc(z) * (mean_z - z));
      }
      out[i] = y;
    }
  }
}

template <typename T, int P, int kThreadsPerRow>
void launch_rows(const T* logits, int64_t rows, int64_t cols, T* entropy, T* grad, const void* grad_entropy,
                 cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr int64_t kRowsPerBlock = kThreads / kThreadsPerRow;
  const int64_t needed = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
  if (grad_entropy == nullptr) {
    auto kernel = &softmax_entropy_kernel<T, P, kThreadsPerRow, false>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, entropy, nullptr, nullptr);
  } else {
    auto kernel = &softmax_entropy_kernel<T, P, kThreadsPerRow, true>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, nullptr, grad,
                                                        static_cast<const A*>(grad_entropy));
  }
}

template <typename T, int P>
void launch_packed(const T* logits, int64_t rows, int64_t cols, T* entropy, T* grad, const void* grad_entropy,
                   cudaStream_t stream) {
  if (cols <= kWarpRowMax) {
    launch_rows<T, P, 32>(logits, rows, cols, entropy, grad, grad_entropy, stream);
  } else {
    launch_rows<T, P, kThreads>(logits, rows, cols, entropy, grad, grad_entropy, stream);
  }
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void launch_softmax_entropy_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols, void* entropy,
                                   void* grad, const void* grad_entropy, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = 16 / sizeof(T);
    const T* in = static_cast<const T*>(logits);
    T* h = static_cast<T*>(entropy);
    T* g = static_cast<T*>(grad);
    if (cols % P == 0 && aligned16(logits) && aligned16(grad)) {
      launch_packed<T, P>(in, rows, cols, h, g, grad_entropy, stream);
    } else {
      launch_packed<T, 1>(in, rows, cols, h, g, grad_entropy, stream);
    }
  });
}

}  // namespace cuda
}  // namespace fastood
