// Entropy of softmax on CUDA, per row of logits f [B, C]. With m = max_k f_k, z_k = f_k - m, e_k = exp(z_k),
// S = sum_k e_k and T = sum_k e_k z_k (stable for |f| up to 1e4 and beyond: z <= 0 and S >= 1):
//   H = log S - T / S,        dH/df_j = -(e_j / S) (z_j - T / S)  (= -p_j (log p_j + H)).
// A row belongs to one warp when C <= kWarpRowMax and to a whole block otherwise. Each thread keeps its first
// kCache packs of the row (16-byte loads: float4, 8 halves, 2 doubles, when C and the pointers allow it) in
// registers, so rows up to kWarpRowMax floats are read from memory once for the max, the sums and the
// gradient; longer rows re-read the rest. float16/bfloat16 are computed in float; float64 in double. NaN:
// the max lets NaN win, so a row holding a NaN (or +inf, inf - inf) gives NaN, as the reference does; a -inf
// gives 0 * -inf = NaN, again as the reference's p log p does.
// Three modes of one kernel: the forward (entropy), the backward (grad = grad_entropy dH/df, the forward's pass
// repeated), and the forward that keeps the gradient (entropy and dH/df as float32, written from the same pass;
// the backward is then launch_scale_rows_kernel: one multiply per value).
#include <cstdint>
#include <type_traits>

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

enum Mode : int { kForward = 0, kBackward = 1, kForwardGrad = 2 };

// kThreadsPerRow threads per row (32: rows of a block are independent warps; kThreads: one row per block),
// P values per load. kForward: entropy[row]. kBackward: grad[row, :] = grad_entropy[row] dH/df (O = T).
// kForwardGrad: entropy[row] and grad[row, :] = dH/df (O = float).
template <typename T, int P, int kThreadsPerRow, int kMode, typename O>
__global__ void __launch_bounds__(kThreads)
    softmax_entropy_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols, T* __restrict__ entropy,
                           O* __restrict__ grad, const typename Acc<T>::type* __restrict__ grad_entropy) {
  using A = typename Acc<T>::type;
  using PackT = Pack<T, P>;
  using PackO = Pack<O, P>;
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

    if (kMode != kBackward && lane == 0) entropy[row] = from_acc<T>(log_acc(sum) - weighted / sum);
    if (kMode == kForward) continue;
    // dH/df_k = (g / S) e_k (T / S - z_k) (g = 1 for kForwardGrad), e_k recomputed (cheaper than keeping it).
    const A mean_z = weighted / sum;
    const A scale = (kMode == kBackward ? grad_entropy[row] : A(1)) / sum;
    PackO* out = reinterpret_cast<PackO*>(grad + row * cols);
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int64_t i = lane + static_cast<int64_t>(c) * kThreadsPerRow;
      if (i < packs) {
        PackO y;
#pragma unroll
        for (int j = 0; j < P; ++j) {
          const A z = to_acc(cache[c].v[j]) - m;
          y.v[j] = from_acc<O>(scale * exp_acc(z) * (mean_z - z));
        }
        out[i] = y;
      }
    }
    for (int64_t i = rest; i < packs; i += kThreadsPerRow) {
      const PackT x = in[i];
      PackO y;
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const A z = to_acc(x.v[j]) - m;
        y.v[j] = from_acc<O>(scale * exp_acc(z) * (mean_z - z));
      }
      out[i] = y;
    }
  }
}

// grad[i] = grad_entropy[i / cols] * dentropy[i] rounded to O, over rows * cols values (grid-stride).
template <typename O>
__global__ void __launch_bounds__(kThreads)
    scale_rows_kernel(const float* __restrict__ dentropy, const float* __restrict__ grad_entropy, int64_t rows,
                      int64_t cols, O* __restrict__ grad) {
  const int64_t n = rows * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    grad[i] = from_acc<O>(grad_entropy[i / cols] * dentropy[i]);
  }
}

template <typename T, int P, int kThreadsPerRow>
void launch_rows(const T* logits, int64_t rows, int64_t cols, T* entropy, void* grad, const void* grad_entropy,
                 bool keep_grad, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  constexpr int64_t kRowsPerBlock = kThreads / kThreadsPerRow;
  const int64_t needed = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
  if (keep_grad) {
    auto kernel = &softmax_entropy_kernel<T, P, kThreadsPerRow, kForwardGrad, float>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, entropy, static_cast<float*>(grad),
                                                        nullptr);
  } else if (grad_entropy == nullptr) {
    auto kernel = &softmax_entropy_kernel<T, P, kThreadsPerRow, kForward, T>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, entropy, nullptr, nullptr);
  } else {
    auto kernel = &softmax_entropy_kernel<T, P, kThreadsPerRow, kBackward, T>;
    FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(logits, rows, cols, nullptr, static_cast<T*>(grad),
                                                        static_cast<const A*>(grad_entropy));
  }
}

template <typename T, int P>
void launch_packed(const T* logits, int64_t rows, int64_t cols, T* entropy, void* grad, const void* grad_entropy,
                   bool keep_grad, cudaStream_t stream) {
  if (cols <= kWarpRowMax) {
    launch_rows<T, P, 32>(logits, rows, cols, entropy, grad, grad_entropy, keep_grad, stream);
  } else {
    launch_rows<T, P, kThreads>(logits, rows, cols, entropy, grad, grad_entropy, keep_grad, stream);
  }
}

bool aligned_to(const void* p, uintptr_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
void launch_any(const void* logits, int64_t rows, int64_t cols, void* entropy, void* grad, const void* grad_entropy,
                bool keep_grad, cudaStream_t stream) {
  constexpr int P = 16 / sizeof(T);
  const T* in = static_cast<const T*>(logits);
  T* h = static_cast<T*>(entropy);
  // packed: 16-byte loads of the logits; the gradient's packs are P values of its own type (float32 when kept)
  const uintptr_t grad_pack = static_cast<uintptr_t>(P) * (keep_grad ? sizeof(float) : sizeof(T));
  if (cols % P == 0 && aligned_to(logits, 16) && aligned_to(grad, grad_pack)) {
    launch_packed<T, P>(in, rows, cols, h, grad, grad_entropy, keep_grad, stream);
  } else {
    launch_packed<T, 1>(in, rows, cols, h, grad, grad_entropy, keep_grad, stream);
  }
}

}  // namespace

void launch_softmax_entropy_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols, void* entropy,
                                   void* grad, const void* grad_entropy, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    launch_any<decltype(tag)>(logits, rows, cols, entropy, grad, grad_entropy, /*keep_grad=*/false, stream);
  });
}

void launch_softmax_entropy_with_grad_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols,
                                             void* entropy, float* dentropy, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {  // float64 logits take the plain ops (the host refuses them)
      launch_any<T>(logits, rows, cols, entropy, dentropy, nullptr, /*keep_grad=*/true, stream);
    }
  });
}

void launch_softmax_entropy_scale_rows_kernel(DType out_dtype, const float* dentropy, const float* grad_entropy,
                                              int64_t rows, int64_t cols, void* grad, cudaStream_t stream) {
  dispatch_dtype(out_dtype, [&](auto tag) {
    using O = decltype(tag);
    if constexpr (!std::is_same_v<O, double>) {
      const int64_t n = rows * cols;
      const int64_t needed = (n + kThreads - 1) / kThreads;
      const unsigned blocks = static_cast<unsigned>(needed < kMaxBlocks ? needed : kMaxBlocks);
      auto kernel = &scale_rows_kernel<O>;
      FASTOOD_LAUNCH(kernel, blocks, kThreads, 0, stream)(dentropy, grad_entropy, rows, cols, static_cast<O*>(grad));
    }
  });
}

}  // namespace cuda
}  // namespace fastood
