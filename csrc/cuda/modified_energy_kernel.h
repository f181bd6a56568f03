// Launcher of the CUDA modified energy kernels (modified_energy_kernel.cu), called by modified_energy.cpp.
// Plain types only, so the .cu file needs no ATen headers.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype_tag.h"  // DType

namespace fastood {
namespace cuda {

// Rows of logits [rows, cols] (contiguous, dtype `dtype`), s = f / c:
//   energy[b] = sum_k s_k (1 - exp(s_k))                      (energy != nullptr; dtype `dtype`)
//   grad[b, k] = scale_b (1/c) (1 - (1 + s_k) exp(s_k))        (grad != nullptr; contiguous, dtype `dtype`)
// scale_b = grad_scale[b] (float, or double for float64 logits) or 1 when grad_scale == nullptr.
void launch_modified_energy_kernel(DType dtype, const void* logits, int64_t rows, int64_t cols, double c,
                                   void* energy, void* grad, const void* grad_scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastood
