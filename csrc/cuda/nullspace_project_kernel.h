// Launcher of the CUDA null-space projection (nullspace_project_kernel.cu), called by nullspace_project.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype_tag.h"  // DType

namespace fastood {
namespace cuda {

// out[b] = P r[b] / |P r[b]| for contiguous jac [batch, dim, latent] (latent <= 64), r and out [batch, dim];
// dtype float32 or float64. One thread block per sample.
void launch_nullspace_project_kernel(DType dtype, const void* jac, const void* r, void* out, int64_t batch,
                                     int64_t dim, int64_t latent, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastood
