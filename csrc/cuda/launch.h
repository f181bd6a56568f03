// Interface between the tensor-handling .cpp side and the light .cu kernels: raw pointers, sizes, a dtype tag
// and a stream. Keeping ATen out of the .cu files keeps the CUDA build short.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace at {
struct PhiloxCudaState;
}

namespace fastood {
namespace cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// Modified energy rows: energy (nullable), grad (nullable) = grad_scale[b] (nullable -> 1) * dE/df.
void launch_modified_energy(DType dtype, const void* logits, int64_t rows, int64_t cols, double c, void* energy,
                            void* grad, const void* grad_scale, cudaStream_t stream);

// Softmax entropy forward (grad == nullptr) or backward (entropy == nullptr, grad_entropy required).
void launch_softmax_entropy(DType dtype, const void* logits, int64_t rows, int64_t cols, void* entropy, void* grad,
                            const void* grad_entropy, cudaStream_t stream);

// Langevin step over a contiguous x [rows, channels, inner]; noise from Philox(seed, offset) when noise_std > 0.
struct LangevinArgs {
  void* x;
  const void* grad;
  int64_t rows, channels, inner;
  double half_step, noise_std;
  const double* lower;
  const double* upper;
  int64_t nbounds;
  const bool* active;
};
int64_t langevin_grid_size(int64_t numel);                 // blocks used, for the Philox offset increment
int64_t langevin_philox_increment(int64_t numel);          // counter offset each launch consumes
void launch_langevin_step(DType dtype, const LangevinArgs& args, const at::PhiloxCudaState& rng, cudaStream_t stream);

// Null-space projection of r [B, D] against jac [B, D, d] (d <= 64), out [B, D].
void launch_nullspace_project(DType dtype, const void* jac, const void* r, void* out, int64_t batch, int64_t dim,
                              int64_t latent, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastood
