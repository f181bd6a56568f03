// FIG modified energy on CUDA: one warp per row, float accumulation (double for float64).
#include "cuda/device_math.cuh"

namespace fastood {
namespace cuda {
namespace {

template <typename T, bool kEnergy, bool kGrad>
__global__ void modified_energy_forward_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols,
                                               typename Acc<T>::type inv_c, T* __restrict__ energy,
                                               T* __restrict__ grad, const T* __restrict__ grad_scale) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < rows; row += warps) {
    const T* in = logits + row * cols;
    const A g = grad_scale ? to_acc(grad_scale[row]) * inv_c : inv_c;
    A sum = 0;
    for (int64_t k = lane; k < cols; k += 32) {
      const A s = to_acc(in[k]) * inv_c;
      const A e = exp_acc(s);
      if (kEnergy) sum += s * (A(1) - e);
      if (kGrad) grad[row * cols + k] = from_acc<T>(g * (A(1) - (A(1) + s) * e));
    }
    if (kEnergy) {
      sum = warp_sum(sum);
      if (lane == 0) energy[row] = from_acc<T>(sum);
    }
  }
}

}  // namespace

void launch_modified_energy(DType dtype, const void* logits, int64_t rows, int64_t cols, double c, void* energy,
                            void* grad, const void* grad_scale, cudaStream_t stream) {
  const int64_t blocks = row_blocks(rows);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using A = typename Acc<T>::type;
    const T* in = static_cast<const T*>(logits);
    const A inv_c = A(1) / static_cast<A>(c);
    if (energy && grad) {
      modified_energy_forward_kernel<T, true, true><<<blocks, kThreads, 0, stream>>>(
          in, rows, cols, inv_c, static_cast<T*>(energy), static_cast<T*>(grad), nullptr);
    } else if (energy) {
      modified_energy_forward_kernel<T, true, false><<<blocks, kThreads, 0, stream>>>(
          in, rows, cols, inv_c, static_cast<T*>(energy), nullptr, nullptr);
    } else {
      modified_energy_forward_kernel<T, false, true><<<blocks, kThreads, 0, stream>>>(
          in, rows, cols, inv_c, nullptr, static_cast<T*>(grad), static_cast<const T*>(grad_scale));
    }
  });
}

}  // namespace cuda
}  // namespace fastood
