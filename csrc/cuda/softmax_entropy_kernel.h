// Launcher of the CUDA softmax entropy kernels (softmax_entropy_kernel.cu), called by softmax_entropy.cpp.
// Plain types only, so the .cu file needs no ATen headers.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype_tag.h"  // DType

namespace fastood {
namespace cuda {

// Rows of logits [rows, cols] (contiguous, dtype `dtype`). Forward (grad_entropy == nullptr):
// entropy[b] = H(softmax(f_b)). Backward: grad[b, k] = grad_entropy[b] dH/df_k, with grad_entropy float
// (double for float64 logits) and grad contiguous in `dtype`.
void launch_softmax_entropy_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols, void* entropy,
                                   void* grad, const void* grad_entropy, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastood
