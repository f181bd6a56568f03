// Softmax entropy on CUDA: one warp per row. H = log S - sum e_k z_k / S with z = f - max f, e = exp(z);
// backward dH/df_j = -g p_j (log p_j + H).
#include "cuda/device_math.cuh"

namespace fastood {
namespace cuda {
namespace {

template <typename T>
__global__ void softmax_entropy_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols,
                                       T* __restrict__ entropy, T* __restrict__ grad,
                                       const T* __restrict__ grad_entropy) {
  using A = typename Acc<T>::type;
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < rows; row += warps) {
    const T* in = logits + row * cols;
    A m = to_acc(in[0]);
    for (int64_t k = lane; k < cols; k += 32) m = nan_max(m, to_acc(in[k]));
    m = warp_max(m);
    A sum = 0, weighted = 0;
    for (int64_t k = lane; k < cols; k += 32) {
      const A z = to_acc(in[k]) - m;
      const A e = exp_acc(z);
      sum += e;
      weighted += e * z;
    }
    sum = warp_sum(sum);
    weighted = warp_sum(weighted);
    const A log_sum = log_acc(sum);
    const A h = log_sum - weighted / sum;
    if (entropy != nullptr) {
      if (lane == 0) entropy[row] = from_acc<T>(h);
    } else {
      const A g = to_acc(grad_entropy[row]);
      for (int64_t k = lane; k < cols; k += 32) {
        const A logp = to_acc(in[k]) - m - log_sum;
        grad[row * cols + k] = from_acc<T>(-g * exp_acc(logp) * (logp + h));
      }
    }
  }
}

}  // namespace

void launch_softmax_entropy(DType dtype, const void* logits, int64_t rows, int64_t cols, void* entropy, void* grad,
                            const void* grad_entropy, cudaStream_t stream) {
  const int64_t blocks = row_blocks(rows);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    softmax_entropy_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(logits), rows, cols,
                                                               static_cast<T*>(entropy), static_cast<T*>(grad),
                                                               static_cast<const T*>(grad_entropy));
  });
}

}  // namespace cuda
}  // namespace fastood
