// Launcher of the CUDA Langevin step (langevin_step_kernel.cu), called by langevin_step.cpp. Plain types only,
// so the .cu file needs no ATen headers beyond the Philox state.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype_tag.h"  // DType

namespace at {
struct PhiloxCudaState;
}

namespace fastood {
namespace cuda {

// x, grad: dense [rows, channels, inner] (numel = rows * per_row, per_row = channels * inner), both in the
// same memory layout: contiguous, or channels_last (memory order [rows, inner, channels], as NHWC / NDHWC).
struct LangevinStepParams {
  void* x;
  const void* grad;
  int64_t numel, per_row, inner, channels;
  bool channels_last;
  double half_step, noise_std;
  const double* lower;   // [nbounds] on the device, nbounds = 1 or channels
  const double* upper;
  int64_t nbounds;
  const bool* active;    // [rows] or nullptr
};

// Philox counter offset one launch over numel elements consumes (reserve it with philox_cuda_state).
int64_t langevin_step_philox_increment(int64_t numel);

// x <- clamp(x - half_step sign(grad) + noise_std z, lower, upper) on active rows; z from Philox(rng) when
// noise_std > 0.
void launch_langevin_step_kernel(DType dtype, const LangevinStepParams& params, const at::PhiloxCudaState& rng,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace fastood
