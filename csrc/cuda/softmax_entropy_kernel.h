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

// The forward that keeps the gradient (float32/bfloat16/float16 logits; float64 launches nothing): entropy[b] =
// H(softmax(f_b)) in `dtype` and dentropy[b, k] = dH/df_k as float32 [rows, cols] (contiguous), from one pass.
void launch_softmax_entropy_with_grad_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols,
                                             void* entropy, float* dentropy, cudaStream_t stream);

// Its backward: grad[b, k] = grad_entropy[b] * dentropy[b, k] rounded to `out_dtype` (not float64), contiguous.
void launch_softmax_entropy_scale_rows_kernel(DType out_dtype, const float* dentropy, const float* grad_entropy,
                                              int64_t rows, int64_t cols, void* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastood
